"""The flat-batch builder: layout of metadata, capacity checks, and reuse of its buffers."""

from __future__ import annotations

import pytest

from model.batch import BatchBuilder, SequenceChunk


def test_layout_of_a_mixed_batch():
    b = BatchBuilder(max_num_tokens=32, max_num_seqs=4, max_blocks_per_seq=4, block_size=4)
    batch = b.build(
        [
            SequenceChunk([9], num_computed=5, block_ids=[7, 2]),  # decode at position 5
            SequenceChunk([1, 2, 3], num_computed=2, block_ids=[3, 0]),  # chunk at positions 2..4
        ]
    )
    a = batch.attn
    assert batch.input_ids.tolist() == [9, 1, 2, 3]
    assert a.positions.tolist() == [5, 2, 3, 4]
    assert a.slot_mapping.tolist() == [2 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3, 0 * 4 + 0]
    assert a.block_tables.tolist() == [[7, 2], [3, 0]]
    assert a.seq_lens.tolist() == [6, 5]
    assert a.query_start_loc.tolist() == [0, 1, 4]
    assert batch.logits_indices.tolist() == [0, 3]
    assert a.num_decodes == 1
    assert [(p.seq_index, p.query_start, p.query_len, p.context_len) for p in a.prefills] == [(1, 1, 3, 2)]


def test_buffers_are_preallocated_and_reused():
    b = BatchBuilder(max_num_tokens=16, max_num_seqs=4, max_blocks_per_seq=2, block_size=4)
    first = b.build([SequenceChunk([1, 2], 0, [0])])
    second = b.build([SequenceChunk([5], 2, [1])])
    assert first.input_ids.data_ptr() == second.input_ids.data_ptr()
    assert second.attn.block_tables.data_ptr() == first.attn.block_tables.data_ptr()


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([SequenceChunk([1, 2], 0, [0]), SequenceChunk([3], 4, [1, 2])], "decode chunks must come before"),
        ([SequenceChunk([1] * 9, 0, [0, 1])], "needs 3 blocks, got 2"),
        ([SequenceChunk([1] * 17, 0, [0, 1, 2, 3, 4])], "exceeds the builder's capacity"),
        ([], "at least one sequence"),
    ],
)
def test_invalid_batches_are_refused(chunks, message):
    b = BatchBuilder(max_num_tokens=16, max_num_seqs=4, max_blocks_per_seq=8, block_size=4)
    with pytest.raises(ValueError, match=message):
        b.build(chunks)
