"""The torch path's decode attention on 16-bit caches: a few sequences compute in fp32 on a CPU
(`FP32_DECODE_MAX_SEQS`), more in the cache's dtype; both against an fp32 reference."""

from __future__ import annotations

import torch

from model.torch_backend import attention

BLOCK, HEADS, KV_HEADS, HEAD_DIM, BLOCKS_PER_SEQ = 4, 6, 2, 16, 5
SEQ_LENS = [13, 1, 20, 7]


def _batch():
    """A bf16 cache whose every slot past a sequence's length is NaN, so any unmasked read leaks."""
    g = torch.Generator().manual_seed(0)
    num_seqs = len(SEQ_LENS)
    kv = torch.randn(2, num_seqs * BLOCKS_PER_SEQ, BLOCK, KV_HEADS, HEAD_DIM, generator=g).bfloat16()
    tables = torch.randperm(num_seqs * BLOCKS_PER_SEQ, generator=g).view(num_seqs, BLOCKS_PER_SEQ)
    for table, length in zip(tables, SEQ_LENS, strict=True):
        slots = kv[:, table].flatten(1, 2)  # a copy: write back through the table
        slots[:, length:] = float("nan")
        kv[:, table] = slots.view(2, BLOCKS_PER_SEQ, BLOCK, KV_HEADS, HEAD_DIM)
    q = torch.randn(num_seqs, HEADS, HEAD_DIM, generator=g).bfloat16()
    return q, kv, tables, torch.tensor(SEQ_LENS)


def _reference(q, kv, table, length):
    k, v = (kv[i][table].flatten(0, 1)[:length].float() for i in (0, 1))  # [L, K, Dh]
    k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))  # [L, H, Dh]
    probs = torch.softmax(torch.einsum("hd,lhd->hl", q.float(), k) * 0.3, dim=-1)
    return torch.einsum("hl,lhd->hd", probs, v)


def test_few_and_many_sequences_match_the_fp32_reference():
    q, kv, tables, lens = _batch()
    few = attention.FP32_DECODE_MAX_SEQS
    assert 1 <= few < len(SEQ_LENS)
    alone = attention.decode_attention(q[:few], kv, tables[:few], lens[:few], 0.3)  # fp32 inside
    batched = attention.decode_attention(q, kv, tables, lens, 0.3)  # bf16 inside
    assert alone.dtype == batched.dtype == torch.bfloat16
    assert not alone.isnan().any() and not batched.isnan().any()
    for i in range(len(SEQ_LENS)):
        want = _reference(q[i], kv, tables[i], SEQ_LENS[i])
        torch.testing.assert_close(batched[i].float(), want, atol=2e-2, rtol=2e-2)
        if i < few:  # rounded to bf16 once, at the end: within half a bf16 step of the reference
            torch.testing.assert_close(alone[i].float(), want, atol=1e-5, rtol=2**-8)
