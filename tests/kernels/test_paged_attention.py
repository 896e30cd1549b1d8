"""The Triton KV write and paged attention equal the torch path, on hostile cache layouts."""

from __future__ import annotations

import random

import pytest
import torch

from model.batch import BatchBuilder, SequenceChunk
from model.torch_backend import attention
from model.triton_backend import paged_attention
from tests.kernels.conftest import DEVICE, FP32_TOL, UPCAST

HEAD_DIM, BLOCK, NUM_BLOCKS = 32, 16, 48


def cache(num_kv_heads: int, dtype=torch.float32) -> torch.Tensor:
    """A layer cache whose every slot starts as NaN: anything read unmasked poisons the result."""
    return torch.full(
        (2, NUM_BLOCKS, BLOCK, num_kv_heads, HEAD_DIM), float("nan"), dtype=dtype, device=DEVICE
    )


def batch_of(work: list[tuple[int, int]], seed: int = 0):
    """work: (tokens already cached, tokens this step) per sequence, decodes first; shuffled blocks."""
    free = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(free)
    chunks = []
    for cached, new in work:
        need = -(-(cached + new) // BLOCK)
        blocks, free = free[:need], free[need:]
        chunks.append(SequenceChunk([7] * new, cached, blocks))
    return BatchBuilder(512, 16, NUM_BLOCKS, BLOCK, DEVICE).build(chunks)


def fill_context(kv: torch.Tensor, meta, work) -> None:
    """Write random keys/values for the cached context of every sequence (positions < cached)."""
    for row, (cached, _new) in enumerate(work):
        for pos in range(cached):
            block = int(meta.block_tables[row, pos // BLOCK])
            kv[:, block, pos % BLOCK] = torch.randn(2, kv.shape[3], HEAD_DIM, device=DEVICE).to(kv.dtype)


# Context lengths around block boundaries (15, 16, 17, 32, 33) and a long one; ragged chunks.
WORK = [(15, 1), (16, 1), (0, 1), (32, 1), (70, 1), (0, 17), (16, 16), (33, 5), (5, 40)]


@pytest.mark.parametrize("group", [1, 2, 4], ids=lambda g: f"gqa{g}")
def test_write_then_attend_matches_torch(group):
    num_kv_heads = 2
    num_heads = num_kv_heads * group
    batch = batch_of(WORK)
    meta = batch.attn
    kv_ref = cache(num_kv_heads)
    fill_context(kv_ref, meta, WORK)
    kv_tri = kv_ref.clone()
    t = meta.num_tokens
    q = torch.randn(t, num_heads, HEAD_DIM, device=DEVICE)
    k = torch.randn(t, num_kv_heads, HEAD_DIM, device=DEVICE)
    v = torch.randn(t, num_kv_heads, HEAD_DIM, device=DEVICE)

    attention.write_kv(kv_ref, k, v, meta.slot_mapping)
    paged_attention.write_kv(kv_tri, k, v, meta.slot_mapping)
    assert torch.equal(kv_ref.nan_to_num(123.0), kv_tri.nan_to_num(123.0))  # same slots, NaN left alone

    scale = HEAD_DIM**-0.5
    expected = attention.paged_attention(q, kv_ref, meta, scale)
    got = paged_attention.paged_attention(q, kv_tri, meta, scale, upcast=UPCAST)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_cache(dtype):
    batch = batch_of(WORK, seed=1)
    meta = batch.attn
    kv = cache(2, dtype)
    fill_context(kv, meta, WORK)
    t = meta.num_tokens
    q = torch.randn(t, 4, HEAD_DIM, device=DEVICE).to(dtype)
    k, v = (torch.randn(t, 2, HEAD_DIM, device=DEVICE).to(dtype) for _ in range(2))
    paged_attention.write_kv(kv, k, v, meta.slot_mapping)
    expected = attention.paged_attention(q.float(), kv.float(), meta, 0.2)  # NaN slots stay masked in fp32
    got = paged_attention.paged_attention(q, kv, meta, 0.2, upcast=UPCAST and dtype == torch.bfloat16)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=4 * torch.finfo(dtype).eps, rtol=0)


def test_negative_slots_are_skipped_and_empty_rows_give_zeros():
    """What CUDA-graph padding relies on: slot -1 writes nothing; a row of length 0 reads nothing."""
    kv = cache(2)
    before = kv.clone()
    k = torch.randn(3, 2, HEAD_DIM, device=DEVICE)
    paged_attention.write_kv(kv, k, k, torch.tensor([-1, 5, -1], device=DEVICE))
    changed = ~(kv.nan_to_num(1e9) == before.nan_to_num(1e9))
    assert changed.sum() == 2 * 2 * HEAD_DIM  # keys and values of token 1 only
    torch.testing.assert_close(kv[0, 0, 5], k[1])
    kv[:, 0, :5] = torch.randn(2, 5, 2, HEAD_DIM, device=DEVICE)  # slots 0-5 of block 0 now hold tokens
    q = torch.randn(2, 4, HEAD_DIM, device=DEVICE)
    tables = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    lens = torch.tensor([0, 6], device=DEVICE)
    out = paged_attention.decode_attention(q, kv, tables, lens, 0.5, upcast=UPCAST)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1], attention.decode_attention(q[1:], kv, tables[1:], lens[1:], 0.5)[0])


# Contexts from empty (graph padding) to 19 blocks: longer than every split's share, shorter than
# the split count, on block edges and off them.
SPLIT_CONTEXTS = [1, 16, 17, 70, 200, 300, 0]


@pytest.mark.parametrize(
    "splits, min_blocks", [(2, 1), (4, 1), (8, 1), (32, 1), (4, 4)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("group", [1, 4], ids=lambda g: f"gqa{g}")
def test_split_contexts_merge_to_the_torch_result(splits, min_blocks, group):
    """Split-KV decode: each context cut into runs of blocks, attended apart, merged."""
    work = [(max(n - 1, 0), 1) for n in SPLIT_CONTEXTS[:-1]]
    meta = batch_of(work, seed=2).attn
    kv = cache(2)
    fill_context(kv, meta, work)
    tables = torch.cat([meta.block_tables[: len(work)], meta.block_tables[:1]])  # + a padding row
    lens = torch.tensor(SPLIT_CONTEXTS, device=DEVICE)
    new = torch.randn(len(work), 2, 2, HEAD_DIM, device=DEVICE)
    attention.write_kv(kv, new[:, 0], new[:, 1], meta.slot_mapping)
    q = torch.randn(len(SPLIT_CONTEXTS), 2 * group, HEAD_DIM, device=DEVICE)
    got = paged_attention.decode_attention(
        q, kv, tables, lens, 0.3, upcast=UPCAST, num_splits=splits, min_blocks_per_split=min_blocks
    )
    expected = attention.decode_attention(q[:-1], kv, tables[:-1], lens[:-1], 0.3)
    assert not got.isnan().any()
    torch.testing.assert_close(got[:-1], expected, **FP32_TOL)
    assert torch.equal(got[-1], torch.zeros_like(got[-1]))
    unsplit = paged_attention.decode_attention(q, kv, tables, lens, 0.3, upcast=UPCAST, num_splits=1)
    torch.testing.assert_close(got, unsplit, **FP32_TOL)


def test_split_count_fills_the_gpu_without_splitting_what_is_busy():
    # Mixtral (8 kv heads), 32k context in blocks of 16, an H100's 132 SMs.
    assert [paged_attention.decode_splits(s, 8, 2048, 132) for s in (1, 2, 8, 16, 17, 128)] == [
        32,
        16,
        4,
        2,
        1,
        1,
    ]
    assert paged_attention.decode_splits(1, 8, 8, 132) == 2  # a context of 8 blocks holds two runs of 4
    assert paged_attention.decode_splits(1, 8, 8, 132, min_blocks=1) == 8
    assert paged_attention.decode_splits(1, 8, 2048, 1) == 1  # the interpreter: one pass unless asked
    with pytest.raises(ValueError, match="power of two"):
        table, lens = torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64)
        paged_attention.decode_attention(
            torch.zeros(1, 2, HEAD_DIM), cache(2), table, lens, 1.0, num_splits=3
        )


def test_rejects_shapes_the_kernels_cannot_tile():
    kv = torch.zeros(2, 4, 5, 2, HEAD_DIM, device=DEVICE)
    q = torch.zeros(1, 2, HEAD_DIM, device=DEVICE)
    with pytest.raises(ValueError, match="block size that is a power of two >= 16, got 5"):
        paged_attention.decode_attention(q, kv, torch.zeros(1, 1, dtype=torch.int64), torch.ones(1), 1.0)
