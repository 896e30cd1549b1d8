"""The step buffer rank 0 hands to the workers: what is written is what is read, in order, and a
step is written only once every worker has read the one before."""

from __future__ import annotations

import os

import pytest

from engine.step_channel import Op, StepReader, StepWriter, capacity_words
from model.batch import SequenceChunk


def pair(payload_words: int, workers: int = 1) -> tuple[StepWriter, list[StepReader]]:
    writer = StepWriter(workers, payload_words)
    readers = [StepReader(writer.path, writer.words, workers, i, fd) for i, fd in enumerate(writer.read_fds)]
    writer.read_fds = []  # the readers own their ends now
    return writer, readers


def as_tuples(chunks):
    return [(list(c.token_ids), c.num_computed, list(c.block_ids)) for c in chunks]


def test_steps_round_trip_through_shared_memory():
    writer, (reader,) = pair(capacity_words(max_num_seqs=4, max_num_tokens=32, max_blocks_per_seq=8))
    try:
        steps = [
            ([SequenceChunk([5], 7, [3]), SequenceChunk(list(range(10, 22)), 0, [0, 1])], [], [0, 12]),
            ([SequenceChunk([9], 8, [3, 4])], [], [0]),
            ([SequenceChunk(list(range(30)), 0, [5, 6, 7, 8])], list(range(29)), [29]),
            ([SequenceChunk(list(range(16)), 0, [9, 10])], [], []),  # a chunk short of its prompt's end
        ]
        for chunks, prompt_rows, sample_rows in steps:
            writer.send(chunks, prompt_rows, sample_rows, timeout_s=1)
            got = reader.receive()
            assert got is not None and got.op is Op.STEP
            assert as_tuples(got.chunks) == as_tuples(chunks)
            assert (list(got.prompt_rows), list(got.sample_rows)) == (prompt_rows, sample_rows)
        with pytest.raises(ValueError, match="exceeds the step buffer"):
            writer.send([SequenceChunk(list(range(100)), 0, list(range(8)))], list(range(100)), [], 1)
        writer.stop()
        assert reader.receive().op is Op.STOP
        writer.unlink()
        assert not writer.path.exists()  # unlinked once mapped: nothing left if rank 0 is killed
    finally:
        writer.close()
    assert reader.receive() is None  # rank 0 closed its pipe: the worker sees it is gone
    reader.close()


def test_a_step_waits_until_every_worker_read_the_last():
    writer, (first, second) = pair(capacity_words(2, 8, 2), workers=2)
    try:
        writer.send([SequenceChunk([1], 0, [0])], [], [0], timeout_s=1)
        assert first.receive().number == 1  # the second worker has not read step 1 yet
        with pytest.raises(TimeoutError, match="did not read step 1"):
            writer.send([SequenceChunk([2], 1, [0])], [], [0], timeout_s=0.05)
        assert second.receive().number == 1
        writer.send([SequenceChunk([2], 1, [0])], [], [0], timeout_s=1)
        assert [first.receive().chunks[0].token_ids, second.receive().chunks[0].token_ids] == [[2], [2]]
    finally:
        writer.close()
        first.close()
        second.close()


def test_a_gone_worker_is_a_broken_pipe():
    writer = StepWriter(1, capacity_words(1, 4, 1))
    os.close(writer.read_fds.pop())
    try:
        with pytest.raises(BrokenPipeError):
            writer.send([SequenceChunk([1], 0, [0])], [], [0], timeout_s=1)
    finally:
        writer.close()
