"""The contract between the model and its compute backends, a leaf of the model package.

The layers hand the KV write, paged attention and the routed experts to a `Kernels` backend:
`model.torch_backend` (the reference; on a CPU the only one) or `model.triton_backend` (CUDA).
This module holds what both speak: that interface, the routing a MoE layer computes, its
stacked expert weights, and the expert dispatch of vLLM's `moe_align_block_size` contract:
token-expert pairs sorted by expert, each expert's group padded to a tile size, one expert per
tile, built on the device with no host sync (fixed shapes, sized for the worst case).

Shape legend: T tokens, A active experts per token (top-k), P = T * A token-expert pairs,
E experts, D hidden size, F expert FFN size, C padded pair capacity, Nt tiles = C / tile,
H query heads, K kv heads, Dh head dim, N cache blocks, B block size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from model.batch import AttentionMetadata


@dataclass(frozen=True, slots=True)
class Routing:
    """Each token's experts and weights. An id equal to the number of experts a layer holds marks
    a pair routed to an expert another rank holds (expert parallel, `local_routing`): both
    backends leave such pairs out."""

    topk_ids: torch.Tensor  # [T, A] int64, chosen experts
    topk_weights: torch.Tensor  # [T, A] fp32, renormalised to sum to 1 per token


def local_routing(routing: Routing, experts: range) -> Routing:
    """`routing` onto the experts one rank holds (`experts` of the layer's whole set): their ids
    renumbered from 0, and pairs routed to other experts given id len(experts) and weight 0."""
    ids = routing.topk_ids - experts.start
    here = (ids >= 0) & (ids < len(experts))  # [T, A]
    return Routing(torch.where(here, ids, len(experts)), routing.topk_weights * here)


# A linear layer over a prepacked weight: x [n, K] -> [n, N].
LinearFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class ExpertWeights:
    """Stacked expert weights: 16-bit, or 8-bit with fp32 per-output-channel scales; on a CPU,
    the torch backend may hold them prepacked instead (`packed`: oneDNN's layout, or the native
    step's, `model.native`), each expert's two matrices as linear layers."""

    w13: torch.Tensor  # [E, 2F, D] (gate; up)
    w2: torch.Tensor  # [E, D, F]
    w13_scale: torch.Tensor | None = None  # [E, 2F]
    w2_scale: torch.Tensor | None = None  # [E, D]
    packed: tuple[tuple[LinearFn, LinearFn], ...] | None = None  # per expert (w13, w2)

    @property
    def num_experts(self) -> int:
        return len(self.packed) if self.packed is not None else self.w13.shape[0]


class Kernels(Protocol):
    name: str

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store k, v [T, K, Dh] at slots [T] of one layer's cache [2, N, B, K, Dh]."""

    def attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Attention of q [T, H, Dh] over the paged context; [T, H, Dh]."""

    def moe(self, x: torch.Tensor, routing: Routing, weights: ExpertWeights) -> torch.Tensor:
        """The routed experts' weighted sum for x [T, D]; [T, D]."""


@dataclass(frozen=True, slots=True)
class MoEDispatch:
    """Token-expert pairs grouped by expert, each group padded to a multiple of `tile_size`."""

    sorted_pair_ids: torch.Tensor  # [C] int64, index into the P flattened pairs; P marks padding
    tile_expert_ids: torch.Tensor  # [Nt] int64, expert of each tile (clamped past num_padded)
    num_padded: torch.Tensor  # [1] int64, used entries of sorted_pair_ids (padding included)
    expert_counts: torch.Tensor  # [E] int64, pairs routed to each expert
    tile_size: int


def sort_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-expert pair ids [P] grouped by expert (stable), and pairs per expert [E]; no host sync.

    Ids must be below `num_experts`: a caller with pairs held elsewhere (id E) passes E + 1.
    """
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
