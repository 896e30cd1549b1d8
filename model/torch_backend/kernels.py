"""The torch backend's `model.backend.Kernels`."""

from __future__ import annotations

import torch

from model.backend import ExpertWeights, Routing
from model.batch import AttentionMetadata
from model.torch_backend.attention import paged_attention, write_kv
from model.torch_backend.moe import routed_experts


class TorchKernels:
    name = "torch"

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        write_kv(kv_cache, k, v, slots)

    def attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        return paged_attention(q, kv_cache, meta, scale)

    def moe(self, x: torch.Tensor, routing: Routing, weights: ExpertWeights) -> torch.Tensor:
        return routed_experts(x, routing, weights)


TORCH_KERNELS = TorchKernels()
