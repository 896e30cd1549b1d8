"""The Triton backend's `model.backend.Kernels`. On CPU (under `TRITON_INTERPRET=1`) its dots are
computed in fp32 (`upcast`), because the interpreter's `tl.dot` is wrong on bf16 operands.
"""

from __future__ import annotations

import torch

from model.backend import ExpertWeights, Routing
from model.batch import AttentionMetadata
from model.triton_backend import fused_moe, paged_attention


class TritonKernels:
    name = "triton"

    def __init__(self, upcast: bool = False) -> None:
        self.upcast = upcast  # fp32 dots: for the interpreter, whose bf16 tl.dot is wrong

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        paged_attention.write_kv(kv_cache, k, v, slots)

    def attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        return paged_attention.paged_attention(q, kv_cache, meta, scale, upcast=self.upcast)

    def moe(self, x: torch.Tensor, routing: Routing, weights: ExpertWeights) -> torch.Tensor:
        if weights.packed is not None:
            raise ValueError("experts prepacked for the CPU (pack_for_cpu) run on the torch backend only")
        w = weights
        return fused_moe.fused_moe(x, routing, w.w13, w.w2, w.w13_scale, w.w2_scale, upcast=self.upcast)
