"""Feed-forward blocks: Mixtral's sparse MoE and the dense SwiGLU FFN, one module for both.

Experts are stored stacked: `w13 [E, 2F, D]` (gate rows first, then up, as vLLM and
transformers 5.x fuse them) and `w2 [E, D, F]`. A dense FFN is the same block with E = 1 and no
router, so a dense checkpoint and an upcycled MoE share every code path but routing.

Dispatch follows the contract of vLLM's `moe_align_block_size`: token-expert pairs sorted by
expert, each expert's group padded to a tile size, one expert per tile. `align_to_experts`
builds it on the device without a host sync (fixed shapes, sized for the worst case), which is
what a fused grouped-GEMM kernel consumes. The torch path (`grouped_experts`) needs no padding:
it sorts the pairs (`sort_pairs_by_expert`, the first half of the same computation), reads the
expert counts on the host (a sync the CPU path may make) and runs one GEMM per non-empty segment.

Shape legend: T tokens, A active experts per token (top-k), P = T * A token-expert pairs,
E experts, D hidden size, F expert FFN size, C padded pair capacity, Nt tiles = C / tile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from model.packed_linear import PackedLinear, pack_weight, packed_linear
from model.quant import WeightQuant, quantize_rows, quantized_linear

if TYPE_CHECKING:
    from model.ops import Kernels


@dataclass(frozen=True, slots=True)
class Routing:
    topk_ids: torch.Tensor  # [T, A] int64, chosen experts
    topk_weights: torch.Tensor  # [T, A] fp32, renormalised to sum to 1 per token


@dataclass(frozen=True, slots=True)
class MoEDispatch:
    """Token-expert pairs grouped by expert, each group padded to a multiple of `tile_size`."""

    sorted_pair_ids: torch.Tensor  # [C] int64, index into the P flattened pairs; P marks padding
    tile_expert_ids: torch.Tensor  # [Nt] int64, expert of each tile (clamped past num_padded)
    num_padded: torch.Tensor  # [1] int64, used entries of sorted_pair_ids (padding included)
    expert_counts: torch.Tensor  # [E] int64, pairs routed to each expert
    tile_size: int


def route(router_logits: torch.Tensor, top_k: int) -> Routing:
    """Mixtral's rule: softmax over all experts (fp32), keep the top-k, renormalise them."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, A]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(topk_ids=ids, topk_weights=weights)


def sort_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-expert pair ids [P] grouped by expert (stable), and pairs per expert [E]; no host sync."""
    flat = topk_ids.flatten()  # [P]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]
    return torch.argsort(flat, stable=True), counts


def align_to_experts(topk_ids: torch.Tensor, num_experts: int, tile_size: int) -> MoEDispatch:
    """Sort token-expert pairs by expert and pad each group to `tile_size`, with no host sync."""
    flat = topk_ids.flatten()  # [P]
    num_pairs = flat.numel()
    device = flat.device
    order, counts = sort_pairs_by_expert(topk_ids, num_experts)  # [P], [E]
    padded = (counts + tile_size - 1) // tile_size * tile_size  # [E]
    padded_end = torch.cumsum(padded, 0)  # [E]
    padded_start = padded_end - padded  # [E]
    start = torch.cumsum(counts, 0) - counts  # [E], unpadded group starts
    expert_of = flat[order]  # [P]
    rank = torch.arange(num_pairs, device=device) - start[expert_of]  # [P], rank inside its group
    worst = num_pairs + num_experts * (tile_size - 1)
    capacity = (worst + tile_size - 1) // tile_size * tile_size
    sorted_pair_ids = torch.full((capacity,), num_pairs, dtype=torch.int64, device=device)  # [C]
    sorted_pair_ids[padded_start[expert_of] + rank] = order
    tile_starts = torch.arange(0, capacity, tile_size, device=device)  # [Nt]
    tile_expert_ids = torch.searchsorted(padded_end, tile_starts, right=True).clamp_(max=num_experts - 1)
    return MoEDispatch(sorted_pair_ids, tile_expert_ids, padded_end[-1:], counts, tile_size)


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
    """Torch-path MoE: one GEMM per expert segment, weighted scatter-add back to tokens; x [T, D]."""
    top_k = routing.topk_ids.shape[1]
    pair_ids, counts = sort_pairs_by_expert(routing.topk_ids, num_experts)  # [P], [E]
    token_ids = pair_ids // top_k  # [P]
    xs = x.index_select(0, token_ids)  # [P, D]
    ys = torch.empty_like(xs)  # [P, D]
    start = 0
    for e, count in enumerate(counts.tolist()):  # host sync: torch path only
        if count:
            ys[start : start + count] = expert(e, xs[start : start + count])
            start += count
    pair_weights = routing.topk_weights.flatten().index_select(0, pair_ids)  # [P] fp32
    ys = (ys * pair_weights[:, None]).to(x.dtype)  # [P, D]
    return torch.zeros_like(x).index_add_(0, token_ids, ys)


def grouped_swiglu(x: torch.Tensor, routing: Routing, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """`grouped_experts` over stacked weights w13 [E, 2F, D], w2 [E, D, F]; x [T, D] -> [T, D]."""
    return grouped_experts(x, routing, w13.shape[0], lambda e, xs: swiglu(xs, w13[e], w2[e]))


@dataclass(frozen=True, slots=True)
class ExpertWeights:
    """Stacked expert weights: 16-bit, or 8-bit with fp32 per-output-channel scales."""

    w13: torch.Tensor  # [E, 2F, D] (gate; up)
    w2: torch.Tensor  # [E, D, F]
    w13_scale: torch.Tensor | None = None  # [E, 2F]
    w2_scale: torch.Tensor | None = None  # [E, D]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU on x [n, D] on the torch path."""
        if self.w13_scale is None or self.w2_scale is None:
            return swiglu(x, self.w13[e], self.w2[e])
        h = silu_and_mul(quantized_linear(x, self.w13[e], self.w13_scale[e]))
        return quantized_linear(h, self.w2[e], self.w2_scale[e])


class FeedForward(nn.Module):
    """SwiGLU experts `[E, ...]` with a router when E > 1 (Mixtral), without one when dense.

    Expert weights are 16-bit, or 8-bit with per-output-channel scales after `quantize_`
    (`model.quant`). The routed experts run through `self.kernels` (the torch path or the fused
    Triton kernel, `model.ops`); a dense FFN and CPU-prepacked experts always take the torch path.
    """

    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int = 1, top_k: int = 1) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * ffn_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size))
        self.w13_scale: nn.Parameter | None = None  # [E, 2F] fp32, 8-bit weights only
        self.w2_scale: nn.Parameter | None = None  # [E, D] fp32
        self.gate: nn.Module | None = None  # the router; a dense FFN has none
        if num_experts > 1:
            self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.kernels: Kernels | None = None  # None: the torch path (`model.ops`)
        self._packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        if self.gate is None:
            return self._expert(0, x)
        routing = route(self.gate(x), self.top_k)
        if self._packed is not None or self.kernels is None:
            return grouped_experts(x, routing, self.num_experts, self._expert)
        return self.kernels.moe(x, routing, self.expert_weights())

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.w13, self.w2, self.w13_scale, self.w2_scale)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            w13, w2 = self._packed[e]
            return packed_linear(silu_and_mul(packed_linear(x, w13)), w2)
        return self.expert_weights().expert(e, x)

    @property
    def quant(self) -> WeightQuant:
        """How the experts are stored, read off their dtype."""
        return WeightQuant.from_dtype(self.w13.dtype)

    @torch.no_grad()
    def quantize_(self, scheme: WeightQuant) -> None:
        """Store the experts in 8 bits. On the meta device (before loading) the new storage is
        empty; elsewhere the current weights are quantized, one matrix at a time."""
        if scheme is WeightQuant.NONE:
            return
        for name in ("w13", "w2"):
            weight = getattr(self, name)
            if weight.is_meta:
                q = torch.empty(weight.shape, dtype=scheme.dtype, device=weight.device)
                scale = torch.empty(weight.shape[:-1], dtype=torch.float32, device=weight.device)
            else:
                q, scale = quantize_rows(weight, scheme)
            setattr(self, name, nn.Parameter(q, requires_grad=False))
            setattr(self, f"{name}_scale", nn.Parameter(scale, requires_grad=False))

    def pack_for_cpu(self) -> None:
        """Prepack each expert's weights for oneDNN and drop the dense copies (one-way; 16-bit only)."""
        if self.quant is not WeightQuant.NONE:
            return
        self._packed = [(pack_weight(self.w13[e]), pack_weight(self.w2[e])) for e in range(self.num_experts)]
        if self.gate is not None:
            self.gate = PackedLinear(self.gate.weight)
        self.w13 = nn.Parameter(torch.empty(0, dtype=self.w13.dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(0, dtype=self.w2.dtype), requires_grad=False)
