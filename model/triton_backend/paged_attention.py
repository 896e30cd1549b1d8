"""Paged attention in Triton: the KV write, decode (one query per sequence) and prefill chunks.

Same cache layout and semantics as the torch path (`model.torch_backend.attention`): one layer's cache is
`[2, N, B, K, Dh]`, keys and values of a token at its slot (block * B + offset); a query at
position p of a sequence sees keys 0 .. p. Both attention kernels walk a sequence's block table
one cache block at a time with an online softmax (fp32 statistics), so no gathered copy of the
context is made. Slots past a sequence's length may hold anything, NaN included: their scores
are replaced by -inf and their values by 0 before use.

- decode: one program per (sequence, kv head, split) computes the G = H / K query heads that
  share the kv head as one [G, Dh] x [Dh, B] tile (padded to 16 rows for the tensor cores), so
  each key and value is read once per sequence. With few sequences, (sequence, kv head) alone
  would leave most of the GPU idle and read a long context with K programs, so the context is
  split ("flash decoding"): each of NUM_SPLITS programs attends to its own run of blocks into
  fp32 partials (unnormalised output, running max and sum) and a second kernel merges them. The
  split count depends only on the launch shape and each sequence's runs are computed on the
  device from its length, so the launch has a fixed shape (CUDA graphs); a row of length 0 (graph
  padding) yields zeros.
- prefill: one program per (prefill chunk, query head, BLOCK_M queries), causal over the
  context already cached plus the chunk itself (written to the cache before the call).
- write: one program per token; a negative slot (graph padding) is skipped.

Shape legend: T tokens, S sequences, H query heads, K kv heads, G = H / K, Dh head dim,
N cache blocks, B block size, M block-table width.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from model.batch import AttentionMetadata

MAX_SPLITS = 32  # splits of one context in a decode launch
MIN_BLOCKS_PER_SPLIT = 4  # cache blocks each split attends to, at least (64 tokens at block size 16)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_slot, stride_c_h,
    NUM_KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < NUM_KV_HEADS)[:, None]
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = cache_ptr + slot * stride_c_slot + offs_h[:, None] * stride_c_h + offs_d[None, :]
    tl.store(dst, k, mask=mask)
    tl.store(dst + stride_c_kv, v, mask=mask)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, K, Dh] at their slots [T] of the layer cache [2, N, B, K, Dh]; slot < 0 is skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    _check_cache(kv_cache, head_dim, k, v)
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        NUM_KV_HEADS=num_kv_heads, BLOCK_H=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
    )  # fmt: skip


@triton.jit
def _attend_block(q, k, v, valid, key_ok, m_i, l_i, acc, scale, UPCAST: tl.constexpr):
    """One online-softmax step of queries q [R, Dh] over a cache block k, v [B, Dh].

    valid [R, B]: which query sees which key; key_ok [B]: which slots hold a token of the sequence.
    """
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    scores = tl.dot(q, tl.trans(k)) * scale  # [R, B] fp32
    scores = tl.where(valid, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing valid yet
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    v = tl.where(key_ok[:, None], v, 0.0)  # garbage (NaN) slots must not reach 0 * v
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _decode_kernel(
    q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_ptr, stats_ptr, scale,
    stride_qs, stride_qh, stride_c_kv, stride_c_block, stride_c_slot, stride_c_h,
    stride_bt, stride_os, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr, MIN_BLOCKS: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    if NUM_SPLITS == 1:
        first, last = 0, num_blocks
    else:  # runs of at least MIN_BLOCKS blocks: a short context leaves the later splits empty
        per_split = tl.maximum(tl.cdiv(num_blocks, NUM_SPLITS), MIN_BLOCKS)
        first = tl.program_id(2) * per_split
        last = tl.minimum(first + per_split, num_blocks)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_SIZE)
    g_ok = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None])

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), dtype=tl.float32)
    kv_offs = offs_n[:, None] * stride_c_slot + kv_head * stride_c_h + offs_d[None, :]
    for b in range(first, last):
        block = tl.load(block_tables_ptr + seq * stride_bt + b).to(tl.int64)
        k = tl.load(cache_ptr + block * stride_c_block + kv_offs)
        v = tl.load(cache_ptr + stride_c_kv + block * stride_c_block + kv_offs)
        key_ok = b * BLOCK_SIZE + offs_n < seq_len
        valid = key_ok[None, :] & g_ok[:, None]
        m_i, l_i, acc = _attend_block(q, k, v, valid, key_ok, m_i, l_i, acc, scale, UPCAST)

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
    else:  # partials [S, H, NUM_SPLITS, Dh] and their (max, sum) [S, H, NUM_SPLITS, 2]
        rows = (seq * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + tl.program_id(2)
        tl.store(part_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None])
        tl.store(stats_ptr + rows * 2, m_i, mask=g_ok)
        tl.store(stats_ptr + rows * 2 + 1, l_i, mask=g_ok)


@triton.jit
def _merge_splits_kernel(
    part_ptr, stats_ptr, out_ptr, stride_os, stride_oh,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One program per (sequence, query head): softmax-weighted sum of its splits' partials."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    rows = (seq * tl.num_programs(1) + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.load(stats_ptr + rows * 2)  # -inf for a split that saw no key
    l = tl.load(stats_ptr + rows * 2 + 1)
    m_max = tl.max(m, 0)
    weight = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # 0 for the empty splits
    total = tl.sum(l * weight, 0)
    acc = tl.load(part_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :])
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefill_kernel(
    q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, out_ptr, scale, first_seq,
    stride_qt, stride_qh, stride_c_kv, stride_c_block, stride_c_slot, stride_c_h,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    seq = first_seq + tl.program_id(0)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len
    kv_head = head // GROUP
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_SIZE)
    m_ok = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=m_ok[:, None])

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    kv_offs = offs_n[:, None] * stride_c_slot + kv_head * stride_c_h + offs_d[None, :]
    visible = tl.minimum(seq_len, context_len + (tile + 1) * BLOCK_M)  # keys this tile can see
    for b in range(0, tl.cdiv(visible, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * stride_bt + b).to(tl.int64)
        k = tl.load(cache_ptr + block * stride_c_block + kv_offs)
        v = tl.load(cache_ptr + stride_c_kv + block * stride_c_block + kv_offs)
        key_pos = b * BLOCK_SIZE + offs_n
        key_ok = key_pos < seq_len
        valid = (key_pos[None, :] <= context_len + offs_m[:, None]) & key_ok[None, :] & m_ok[:, None]
        m_i, l_i, acc = _attend_block(q, k, v, valid, key_ok, m_i, l_i, acc, scale, UPCAST)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


def paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float, upcast: bool = False
) -> torch.Tensor:
    """Attention of q [T, H, Dh] over the cached context (decodes first, then prefill chunks)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    _check_cache(kv_cache, head_dim, q)
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        decode_attention(
            q[:nd], kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale, upcast, out[:nd]
        )
    if meta.prefills:
        num_kv_heads = kv_cache.shape[3]
        block_m = prefill_block_m(q.device)
        max_q = max(span.query_len for span in meta.prefills)
        grid = (len(meta.prefills), num_heads, triton.cdiv(max_q, block_m))
        _prefill_kernel[grid](
            q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out, scale, nd,
            q.stride(0), q.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            meta.block_tables.stride(0), out.stride(0), out.stride(1),
            GROUP=num_heads // num_kv_heads, BLOCK_M=block_m, BLOCK_SIZE=kv_cache.shape[2],
            HEAD_DIM=head_dim, UPCAST=upcast,
        )  # fmt: skip
    return out


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    upcast: bool = False,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    min_blocks_per_split: int | None = None,
) -> torch.Tensor:
    """One query per sequence: q [S, H, Dh] over blocks [S, M] holding seq_lens [S] tokens.

    `num_splits` (a power of two; by default `decode_splits` for this launch on this device)
    divides each context into that many runs of at least `min_blocks_per_split` blocks
    (default MIN_BLOCKS_PER_SPLIT).
    """
    num_seqs, num_heads, head_dim = q.shape
    _check_cache(kv_cache, head_dim, q)
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    min_blocks = MIN_BLOCKS_PER_SPLIT if min_blocks_per_split is None else min_blocks_per_split
    if num_splits is None:
        max_blocks = block_tables.shape[1]
        num_splits = decode_splits(num_seqs, num_kv_heads, max_blocks, sm_count(q.device), min_blocks)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    part = stats = out  # not read when the context is not split
    if num_splits > 1:
        part = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        stats = torch.empty(num_seqs, num_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, part, stats, scale,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=kv_cache.shape[2],
        HEAD_DIM=head_dim, NUM_SPLITS=num_splits, MIN_BLOCKS=min_blocks, UPCAST=upcast,
    )  # fmt: skip
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part, stats, out, out.stride(0), out.stride(1), NUM_SPLITS=num_splits, HEAD_DIM=head_dim
        )
    return out


def decode_splits(
    num_seqs: int, num_kv_heads: int, max_blocks: int, num_sms: int, min_blocks: int = MIN_BLOCKS_PER_SPLIT
) -> int:
    """Splits per context for a decode launch: the largest power of two that keeps the launch
    within about two programs per SM, at most MAX_SPLITS, and no more than a context of
    `max_blocks` blocks can fill with runs of `min_blocks`. (Mixtral on an H100, 132 SMs:
    32 splits at batch 1, 4 at batch 8, none from batch 17 on.)"""
    programs = num_seqs * num_kv_heads
    useful = -(-max_blocks // min_blocks)
    splits = 1
    while splits < MAX_SPLITS and 2 * splits <= useful and programs * 2 * splits <= 2 * num_sms:
        splits *= 2
    return splits


def prefill_block_m(device: torch.device) -> int:
    """Queries per prefill program: 64 on a GPU; 16 under the interpreter, which is slow on big tiles."""
    return 64 if device.type == "cuda" else 16


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter: no split by default)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_cache(kv_cache: torch.Tensor, head_dim: int, *tensors: torch.Tensor) -> None:
    """The kernels index every head vector as contiguous, and tile blocks and head dims as powers of 2."""
    block_size = kv_cache.shape[2]
    if any(t.stride(-1) != 1 for t in (kv_cache, *tensors)):
        raise ValueError(
            "the Triton attention kernels need contiguous head vectors (stride 1 in the last dim)"
        )
    for name, value in (("block size", block_size), ("head dim", head_dim)):
        if value < 16 or value & (value - 1):
            raise ValueError(
                f"the Triton attention kernels need a {name} that is a power of two >= 16, got {value}"
            )
