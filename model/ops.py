"""Choosing where a layer's heavy compute runs: the torch backend or the Triton one.

The model's layers delegate the KV write, paged attention and the routed experts to a backend
(`model.backend.Kernels`); everything else (projections, norms, rotary, routing) is plain torch
on both.
- `model.torch_backend`: the reference path; on CPU the only one (with oneDNN-prepacked weights).
- `model.triton_backend`: the fused MoE and paged attention kernels; the default on CUDA, and
  testable on CPU under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import torch

from model.backend import Kernels
from model.options import KernelChoice, choices
from model.torch_backend.kernels import TORCH_KERNELS

KERNEL_CHOICES = choices(KernelChoice)


def select_kernels(choice: str, device: torch.device | str) -> Kernels:
    """'auto' (Triton on CUDA, torch elsewhere), 'torch', or 'triton' (on CPU: the interpreter);
    'native' (CPU only) is the torch kernels here, the native decode step beside them being the
    step's (`engine.forward`)."""
    device = torch.device(device)
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels {choice!r}; use one of {', '.join(KERNEL_CHOICES)}")
    if choice == "native" and device.type != "cpu":
        raise ValueError(f"kernels='native' is the CPU decode step; the model is on {device}")
    if choice in ("torch", "native") or (choice == "auto" and device.type != "cuda"):
        return TORCH_KERNELS
    try:
        from model.triton_backend.kernels import TritonKernels  # only here: the CPU path never needs triton
    except ImportError as exc:
        raise RuntimeError(f"kernels={choice!r} needs triton, which is not importable: {exc}") from exc
    return TritonKernels(upcast=device.type != "cuda")
