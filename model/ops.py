"""Where a layer's heavy compute runs: the torch path or the Triton kernels, behind one interface.

The model's layers delegate the KV write, paged attention and the routed experts to a `Kernels`
object; everything else (projections, norms, rotary, routing) is plain torch on both paths.
- `TorchKernels`: the reference path; on CPU the only one (with oneDNN-prepacked weights).
- `TritonKernels`: `model.kernels` (fused MoE, paged attention); the default on CUDA, and
  testable on CPU under `TRITON_INTERPRET=1`, where dots are computed in fp32 (`upcast`)
  because the interpreter's `tl.dot` is wrong on bf16 operands.
"""

from __future__ import annotations

from typing import Protocol

import torch

from model import paged_attention as torch_attention
from model.batch import AttentionMetadata
from model.moe import ExpertWeights, Routing, grouped_experts
from model.options import KernelChoice, choices

KERNEL_CHOICES = choices(KernelChoice)


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


class TorchKernels:
    name = "torch"

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        torch_attention.write_kv(kv_cache, k, v, slots)

    def attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        return torch_attention.paged_attention(q, kv_cache, meta, scale)

    def moe(self, x: torch.Tensor, routing: Routing, weights: ExpertWeights) -> torch.Tensor:
        return grouped_experts(x, routing, weights.w13.shape[0], weights.expert)


class TritonKernels:
    name = "triton"

    def __init__(self, upcast: bool = False) -> None:
        # Import here so the CPU path never needs triton; fail at selection, not mid-forward.
        from model.kernels import fused_moe, paged_attention

        self.upcast = upcast  # fp32 dots: for the interpreter, whose bf16 tl.dot is wrong
        self._moe = fused_moe
        self._attn = paged_attention

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        self._attn.write_kv(kv_cache, k, v, slots)

    def attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        return self._attn.paged_attention(q, kv_cache, meta, scale, upcast=self.upcast)

    def moe(self, x: torch.Tensor, routing: Routing, weights: ExpertWeights) -> torch.Tensor:
        w = weights
        return self._moe.fused_moe(x, routing, w.w13, w.w2, w.w13_scale, w.w2_scale, upcast=self.upcast)


TORCH_KERNELS = TorchKernels()


def select_kernels(choice: str, device: torch.device | str) -> Kernels:
    """'auto' (Triton on CUDA, torch elsewhere), 'torch', or 'triton' (on CPU: the interpreter)."""
    device = torch.device(device)
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels {choice!r}; use one of {', '.join(KERNEL_CHOICES)}")
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return TORCH_KERNELS
    try:
        return TritonKernels(upcast=device.type != "cuda")
    except ImportError as exc:
        raise RuntimeError(f"kernels={choice!r} needs triton, which is not importable: {exc}") from exc
