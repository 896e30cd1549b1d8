"""The routed experts on the torch path: one GEMM per expert's segment of the sorted pairs.

No padding is needed here: the pairs are sorted by expert (`sort_pairs_by_expert`, the first
half of the dispatch contract), the expert counts are read on the host (a sync this path may
make), and each non-empty segment runs its expert. An expert is a SwiGLU over 16-bit, 8-bit or
prepacked weights.

Shape legend: T tokens, A active experts per token, P = T * A pairs, D hidden, F expert FFN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from model.backend import ExpertWeights, Routing, sort_pairs_by_expert
from model.quant import quantized_linear

# (expert index, its tokens [n, D]) -> that expert's output [n, D]
ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU FFN: x [n, D], w13 [2F, D] (gate; up), w2 [D, F] -> [n, D]."""
    return F.linear(silu_and_mul(F.linear(x, w13)), w2)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[n, 2F] (gate; up) -> silu(gate) * up [n, F]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def grouped_experts(x: torch.Tensor, routing: Routing, num_experts: int, expert: ExpertFn) -> torch.Tensor:
    """Torch-path MoE: one GEMM per expert segment, weighted scatter-add back to tokens; x [T, D].

    One token or many, the same bits: each pair's output is weighted in fp32 and rounded to x's
    dtype, then added to its token in ascending expert order.
    """
    if x.shape[0] == 1:
        return _one_token(x, routing, num_experts, expert)
    return _sorted_pairs(x, routing, num_experts, expert)


def _sorted_pairs(x: torch.Tensor, routing: Routing, num_experts: int, expert: ExpertFn) -> torch.Tensor:
    """`grouped_experts` for many tokens: the pairs sorted by expert, each expert's GEMM on its
    segment, the weighted outputs scattered back to their tokens."""
    top_k = routing.topk_ids.shape[1]
    # One group more than the experts: the pairs another rank's experts take (expert parallel),
    # sorted last and left out.
    pair_ids, counts = sort_pairs_by_expert(routing.topk_ids, num_experts + 1)  # [P], [E + 1]
    per_expert = counts.tolist()[:num_experts]  # host sync: torch path only
    pair_ids = pair_ids[: sum(per_expert)]
    token_ids = pair_ids // top_k  # [P]
    xs = x.index_select(0, token_ids)  # [P, D]
    ys = torch.empty_like(xs)  # [P, D]
    start = 0
    for e, count in enumerate(per_expert):
        if count:
            ys[start : start + count] = expert(e, xs[start : start + count])
            start += count
    pair_weights = routing.topk_weights.flatten().index_select(0, pair_ids)  # [P] fp32
    ys = (ys * pair_weights[:, None]).to(x.dtype)  # [P, D]
    return torch.zeros_like(x).index_add_(0, token_ids, ys)


def _one_token(x: torch.Tensor, routing: Routing, num_experts: int, expert: ExpertFn) -> torch.Tensor:
    """`grouped_experts` for one token (a decode step at batch 1): its experts run on x as it is,
    with no sort, gather or scatter; 4 tensor operators besides the experts instead of about 15,
    each costing microseconds in eager mode however small its tensors."""
    out = torch.zeros_like(x)
    pairs = sorted(zip(routing.topk_ids[0].tolist(), routing.topk_weights[0].tolist(), strict=True))
    for e, weight in pairs:
        if e < num_experts:  # id num_experts: another rank's expert (expert parallel)
            out += (expert(e, x) * weight).to(x.dtype)  # the fp32 product, rounded once
    return out


def grouped_swiglu(x: torch.Tensor, routing: Routing, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """`grouped_experts` over stacked weights w13 [E, 2F, D], w2 [E, D, F]; x [T, D] -> [T, D]."""
    return grouped_experts(x, routing, w13.shape[0], lambda e, xs: swiglu(xs, w13[e], w2[e]))


def expert_forward(weights: ExpertWeights, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's SwiGLU on x [n, D]."""
    if weights.packed is not None:
        w13, w2 = weights.packed[e]
        return w2(silu_and_mul(w13(x)))
    if weights.w13_scale is None or weights.w2_scale is None:
        return swiglu(x, weights.w13[e], weights.w2[e])
    h = silu_and_mul(quantized_linear(x, weights.w13[e], weights.w13_scale[e]))
    return quantized_linear(h, weights.w2[e], weights.w2_scale[e])


def routed_experts(x: torch.Tensor, routing: Routing, weights: ExpertWeights) -> torch.Tensor:
    """The routed experts' weighted sum for x [T, D]: `grouped_experts` over `weights`."""
    return grouped_experts(x, routing, weights.num_experts, lambda e, xs: expert_forward(weights, e, xs))
