"""The step buffer rank 0 hands to the workers: what is written is what is read, in order."""

from __future__ import annotations

import os

import pytest

from engine.step_channel import Op, StepReader, StepWriter, capacity_words
from model.batch import SequenceChunk


def test_steps_round_trip_through_shared_memory():
    words = capacity_words(max_num_seqs=4, max_num_tokens=32, max_blocks_per_seq=8)
    writer = StepWriter(1, words)
    reader = StepReader(writer.path, words, writer.read_fds[0])
    writer.read_fds = []  # the reader owns its end now
    try:
        steps = [
            ([SequenceChunk([5], 7, [3]), SequenceChunk(list(range(10, 22)), 0, [0, 1])], [0, 12]),
            ([SequenceChunk([9], 8, [3, 4])], [0]),
            ([SequenceChunk(list(range(30)), 0, [5, 6, 7, 8])], list(range(29)) + [29]),
        ]
        for chunks, rows in steps:
            writer.send(chunks, rows)
            got = reader.receive()
            assert got is not None and got.op is Op.STEP
            assert [(list(c.token_ids), c.num_computed, list(c.block_ids)) for c in got.chunks] == [
                (list(c.token_ids), c.num_computed, list(c.block_ids)) for c in chunks
            ]
            assert list(got.rows) == rows
        with pytest.raises(ValueError, match="exceeds the step buffer"):
            writer.send([SequenceChunk(list(range(100)), 0, list(range(8)))], list(range(100)))
        writer.stop()
        assert reader.receive().op is Op.STOP
    finally:
        writer.close()
        assert not writer.path.exists()
    assert reader.receive() is None  # rank 0 closed its pipe: the worker sees it is gone
    reader.close()


def test_a_gone_worker_is_a_broken_pipe():
    writer = StepWriter(1, capacity_words(1, 4, 1))
    os.close(writer.read_fds.pop())
    try:
        with pytest.raises(BrokenPipeError):
            writer.send([SequenceChunk([1], 0, [0])], [0])
    finally:
        writer.close()
