"""A linear layer on the native library's packed weights: what the torch path runs (prefill
chunks, mixed steps) on the same packed tensors the native decode step reads, so the model
holds each weight once."""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_int32, c_int64, c_void_p

import torch
from torch import nn

from model.native.build import NativeLibrary

F32, BF16, INT8 = 0, 1, 2
DTYPE_CODES = {torch.float32: F32, torch.bfloat16: BF16, torch.int8: INT8}


class LinearDesc(ctypes.Structure):
    """`Linear` of decode.cpp: a packed [N, K] weight."""

    _fields_ = [
        ("w", c_void_p),
        ("scale", c_void_p),
        ("n", c_int64),
        ("k", c_int64),
        ("dtype", c_int32),
        ("pad_", c_int32),
    ]


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A [N, K] linear weight (N, K multiples of 16) as 16-row blocks, each contiguous over K:
    bf16 as [N/16, K/2, 16, 2] (the pairs AVX512-BF16 dot products take), fp32 and int8 as
    [N/16, K, 16]."""
    n, k = weight.shape
    w = weight.detach()
    if w.dtype == torch.bfloat16:
        return w.reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return w.reshape(n // 16, 16, k).permute(0, 2, 1).contiguous()


class NativeLinear(nn.Module):
    """A bias-free linear layer whose weight lives packed for `decode.cpp` (inference only):
    fp32, bf16, or int8 with fp32 per-row scales (`model.quant`, W8A16 in fp32 registers)."""

    def __init__(
        self, weight: torch.Tensor, lib: NativeLibrary, threads: int, scale: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if (weight.dtype == torch.int8) != (scale is not None):
            raise ValueError("int8 weights, and only they, take per-row scales")
        self.out_features, self.in_features = weight.shape
        # The rows' type the GEMM reads: bf16 against bf16 weights, fp32 against fp32 and int8.
        self.input_dtype = torch.bfloat16 if weight.dtype == torch.bfloat16 else torch.float32
        self.packed = pack_weight(weight)
        self.scale = None if scale is None else scale.detach().float().contiguous()
        self.desc = LinearDesc(
            self.packed.data_ptr(),
            None if self.scale is None else self.scale.data_ptr(),
            self.out_features,
            self.in_features,
            DTYPE_CODES[weight.dtype],
            0,
        )
        self._fn = lib.dll.native_linear
        self._fn.argtypes = [POINTER(LinearDesc), c_void_p, c_int64, c_void_p, c_int32]
        self._fn.restype = None
        self._threads = threads

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N]
        rows = x.reshape(-1, self.in_features).to(self.input_dtype).contiguous()
        y = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
        if rows.shape[0]:
            self._fn(ctypes.byref(self.desc), rows.data_ptr(), rows.shape[0], y.data_ptr(), self._threads)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
