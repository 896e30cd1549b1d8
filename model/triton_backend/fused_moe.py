"""Fused MoE in Triton: two grouped-GEMM launches over token-expert pairs sorted by expert.

The dispatch is `model.backend.align_to_experts` (vLLM's `moe_align_block_size` contract): pairs
grouped by expert, each group padded to BLOCK_M, so every M-tile of the sorted pair list belongs
to exactly one expert and one launch covers all experts.

1. gate/up: for the pairs of a tile, h = silu(x W1^T) * (x W3^T), both accumulators in one
   program, SiLU-and-multiply fused in the epilogue; h is stored at the pair's row [P, F].
2. down: y = h W2^T scaled by the pair's routing weight, stored at the pair's row [P, D] in
   fp32; the top-k rows of a token are then summed.

8-bit experts (W8A16): int8 or fp8-e4m3 weights with one fp32 scale per output channel are
loaded, converted to the activation dtype in registers and multiplied; the per-channel scale
factors out of the K reduction and is applied to the accumulator once.

Under expert parallelism a pair routed to an expert this rank does not hold has id E
(`model.backend.Routing`): its group's tiles write zeros and read no weights.

No host sync: tile count and capacity are fixed by the token count, and tiles past the padded
length read it on the device and exit, so the layer can be captured in a CUDA graph.

Shape legend: T tokens, A top-k, P = T * A pairs, E experts, D hidden, F expert FFN size,
C padded pair capacity (a multiple of BLOCK_M).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.backend import MoEDispatch, Routing, align_to_experts
from model.triton_backend.moe_configs import TileConfig, launch_tiles, moe_tile_config


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # [rows, K] activations; row of pair p is p // A_DIV
    w_ptr,  # [E, N_total, K] expert weights (N_total = 2N when GATED: gate rows, then up rows)
    scale_ptr,  # [E, N_total] fp32 per-output-channel scales (QUANTIZED only)
    out_ptr,  # [P, N] output, row = pair id
    sorted_pair_ids_ptr,  # [C] pair ids grouped by expert, P marks padding
    tile_expert_ids_ptr,  # [C // BLOCK_M] expert of each M-tile
    num_padded_ptr,  # [1] used length of sorted_pair_ids
    pair_weights_ptr,  # [P] fp32 routing weight of each pair (ROUTE_WEIGHT only)
    num_pairs,
    num_experts,
    N,
    K,
    capacity,
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_om,
    A_DIV: tl.constexpr,
    GATED: tl.constexpr,
    ROUTE_WEIGHT: tl.constexpr,
    QUANTIZED: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M M-tiles share each N-tile of weights while it is in L2.
    pid = tl.program_id(0)
    num_m = capacity // BLOCK_M
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pair_ids_ptr + offs_m)
    row_ok = pairs < num_pairs
    rows = pairs // A_DIV
    expert = tl.load(tile_expert_ids_ptr + pid_m).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if expert >= num_experts:  # pairs another rank's experts take (expert parallel): zeros
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptrs, zeros, mask=row_ok[:, None] & col_ok[None, :])
        return
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn  # [1, BN]
    w_ptrs += offs_k[:, None]  # [BK, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot is wrong on bf16 operands
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        elif QUANTIZED:
            w = w.to(a.dtype)
        acc += tl.dot(a, w)
        if GATED:
            w_up = tl.load(w_ptrs + N * stride_wn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                w_up = w_up.to(tl.float32)
            elif QUANTIZED:
                w_up = w_up.to(a.dtype)
            acc_up += tl.dot(a, w_up)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if QUANTIZED:
        scales = scale_ptr + expert * stride_se + offs_n
        acc *= tl.load(scales, mask=col_ok, other=0.0)[None, :]
        if GATED:
            acc_up *= tl.load(scales + N, mask=col_ok, other=0.0)[None, :]
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up, in fp32
    if ROUTE_WEIGHT:
        acc *= tl.load(pair_weights_ptr + pairs, mask=row_ok, other=0.0)[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fused_moe(
    x: torch.Tensor,
    routing: Routing,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    config: TileConfig | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """MoE of x [T, D] over experts w13 [E, 2F, D] (gate; up), w2 [E, D, F] -> [T, D].

    Weights are 16-bit, or 8-bit (int8 / fp8 e4m3) with fp32 per-output-channel scales
    w13_scale [E, 2F], w2_scale [E, D]. `upcast` computes the dots in fp32 (for the interpreter).
    """
    num_tokens, hidden = x.shape
    num_experts, two_f, _ = w13.shape
    ffn = two_f // 2
    top_k = routing.topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    quantized = w13_scale is not None
    if quantized != (w2_scale is not None):
        raise ValueError("w13_scale and w2_scale must be given together")
    x = x.contiguous()
    cfg = config or moe_tile_config(num_experts, ffn, num_tokens, x.device)
    # One group more than the experts: pairs routed to another rank's experts (expert parallel).
    dispatch = align_to_experts(routing.topk_ids, num_experts + 1, cfg.block_m)
    pair_weights = routing.topk_weights.flatten().float()  # [P]

    h = torch.empty(num_pairs, ffn, dtype=x.dtype, device=x.device)  # [P, F]
    _grouped_gemm(x, w13, w13_scale, h, dispatch, None, top_k, cfg, upcast)
    y = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)  # [P, D]
    _grouped_gemm(h, w2, w2_scale, y, dispatch, pair_weights, 1, cfg, upcast)
    return y.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)


def _grouped_gemm(
    a: torch.Tensor,  # [rows, K]
    w: torch.Tensor,  # [E, N or 2N, K]: 2N rows make it the gated (gate/up) launch
    scale: torch.Tensor | None,  # [E, N or 2N] for 8-bit weights
    out: torch.Tensor,  # [P, N]
    dispatch: MoEDispatch,
    pair_weights: torch.Tensor | None,  # [P]: scale each pair's row by its routing weight
    a_div: int,  # row of pair p in `a` is p // a_div
    cfg: TileConfig,
    upcast: bool,
) -> None:
    if w.stride(-1) != 1 or a.stride(-1) != 1:
        raise ValueError("fused_moe needs row-major weights and activations")
    n, k = out.shape[1], a.shape[1]
    gated = w.shape[1] == 2 * n
    tiles = launch_tiles(cfg, gated, a.element_size())
    capacity = dispatch.sorted_pair_ids.numel()
    unused = dispatch.sorted_pair_ids  # placeholder for pointers a variant never reads
    grid = (capacity // cfg.block_m * triton.cdiv(n, tiles.block_n),)
    # fmt: off
    _grouped_gemm_kernel[grid](
        a, w, unused if scale is None else scale, out,
        dispatch.sorted_pair_ids, dispatch.tile_expert_ids, dispatch.num_padded,
        unused if pair_weights is None else pair_weights,
        out.shape[0], w.shape[0], n, k, capacity,
        a.stride(0), w.stride(0), w.stride(1), 0 if scale is None else scale.stride(0), out.stride(0),
        A_DIV=a_div, GATED=gated, ROUTE_WEIGHT=pair_weights is not None, QUANTIZED=scale is not None,
        UPCAST=upcast, BLOCK_M=cfg.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=tiles.num_stages,
    )
    # fmt: on
