"""Paged attention on the torch path (CPU, and the GPU reference the Triton kernels are tested against).

The KV cache of one layer is `[2, N, B, K, Dh]` (keys, values; N blocks of B slots). Tokens are
written to their slots first, then each query attends over its sequence's blocks.

Shape legend: T tokens, S sequences, H query heads, K kv heads, G = H / K, Dh head dim,
N cache blocks, B block size, M block-table width, L gathered context length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.batch import AttentionMetadata, PrefillSpan

# Up to this many sequences, CPU decode attention of 16-bit caches computes in fp32: its tiny
# matmuls then run on MKL's sgemm, whose fixed cost is below oneDNN's bf16 batched matmul.
# Engine step, small checkpoint, bf16, 2 cores, in one process, interleaved with the bf16 way:
# 1.06x, 1.10x and 1.17x at 1 sequence, 1.10x at 2; 0.99x at 4, 0.94x at 8 (hence the bound).
# Float32 models take the same operators either way.
FP32_DECODE_MAX_SEQS = 2


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, K, Dh] at their slots [T] of the layer cache [2, N, B, K, Dh]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Attention of q [T, H, Dh] over the cached context; returns [T, H, Dh]."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = decode_attention(q[:nd], kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale)
    for span in meta.prefills:
        rows = slice(span.query_start, span.query_start + span.query_len)
        out[rows] = prefill_attention(q[rows], kv_cache, meta.block_tables[span.seq_index], span, scale)
    return out


def decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per sequence: q [S, H, Dh] over blocks [S, M] holding seq_lens [S] tokens.

    Fixed shapes and no host sync. Slots past a sequence's length (padding blocks, the free tail
    of its last block) may hold anything, NaN included: their scores are masked (which replaces
    NaN) and their values zeroed, so they contribute exactly nothing.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    small = num_seqs <= FP32_DECODE_MAX_SEQS and q.device.type == "cpu"
    dtype = torch.float32 if small else q.dtype
    k = kv_cache[0][block_tables].flatten(1, 2).to(dtype)  # [S, L, K, Dh], L = M * B
    v = kv_cache[1][block_tables].flatten(1, 2).to(dtype)  # [S, L, K, Dh]
    valid = torch.arange(k.shape[1], device=q.device) < seq_lens[:, None]  # [S, L]
    qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim).to(dtype)  # [S, K, G, Dh]
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float() * scale  # [S, K, G, L]
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(dtype)  # [S, K, G, L]
    v = v.masked_fill(~valid[:, :, None, None], 0.0).transpose(1, 2)  # [S, K, L, Dh]
    return torch.matmul(probs, v).view(num_seqs, num_heads, head_dim).to(q.dtype)


def prefill_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, span: PrefillSpan, scale: float
) -> torch.Tensor:
    """A chunk of queries q [Tq, H, Dh] at the end of a sequence of span.seq_len cached tokens.

    Query i (position context_len + i) sees keys 0 .. context_len + i. Every gathered slot was
    written (by earlier steps or by `write_kv` this step), so no masking of garbage is needed.
    """
    block_size = kv_cache.shape[2]
    num_blocks = -(-span.seq_len // block_size)
    blocks = block_table[:num_blocks]  # [nb]
    k = kv_cache[0][blocks].flatten(0, 1)[: span.seq_len].transpose(0, 1)  # [K, L, Dh]
    v = kv_cache[1][blocks].flatten(0, 1)[: span.seq_len].transpose(0, 1)  # [K, L, Dh]
    qh = q.transpose(0, 1)  # [H, Tq, Dh]
    if span.context_len == 0:
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = torch.ones(span.query_len, span.seq_len, dtype=torch.bool, device=q.device).tril(
            diagonal=span.context_len
        )  # [Tq, L]
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)  # [Tq, H, Dh]
