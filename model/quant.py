"""8-bit expert weights: weight-only (W8A16) with one fp32 scale per output channel.

Experts are ~97% of Mixtral's parameters, so storing them in 8 bits takes the model from
~93 GB to ~48 GB and halves the bytes a decode step reads. Two formats:
- fp8 e4m3 (`torch.float8_e4m3fn`, max 448): the default on GPUs that convert it natively
  (compute capability 8.9+: Ada, Hopper);
- int8 (symmetric, max 127): everywhere else, CPU included.

Quantization is per row of a [..., N, K] weight (a row is one output channel), so the scale
factors out of the dot product: y = (x @ q^T) * s. The torch path and the Triton kernel both
compute exactly that, which is what makes them comparable; the error against the 16-bit weight
is the rounding of q (relative 2^-4 for e4m3, 1/254 of the row's max for int8).
"""

from __future__ import annotations

from enum import StrEnum

import torch

from model.options import Quantization, choices


class WeightQuant(StrEnum):
    NONE = "none"
    INT8 = "int8"
    FP8 = "fp8"

    @property
    def dtype(self) -> torch.dtype | None:
        return {WeightQuant.INT8: torch.int8, WeightQuant.FP8: torch.float8_e4m3fn}.get(self)

    @classmethod
    def from_dtype(cls, dtype: torch.dtype) -> WeightQuant:
        """The scheme whose storage dtype this is; NONE for any other dtype."""
        return next((scheme for scheme in cls if scheme.dtype == dtype), cls.NONE)

    @property
    def max_value(self) -> float:
        return {WeightQuant.INT8: 127.0, WeightQuant.FP8: 448.0}[self]


QUANT_CHOICES = choices(Quantization)


def resolve_quant(requested: str | None, device: torch.device | str) -> WeightQuant:
    """'none' / None, 'int8', 'fp8', or '8bit' (fp8 where the GPU converts it natively, else int8)."""
    name = (requested or "none").lower()
    if name not in QUANT_CHOICES:
        raise ValueError(f"unknown quantization {requested!r}; use one of {', '.join(QUANT_CHOICES)}")
    if name != "8bit":
        return WeightQuant(name)
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        return WeightQuant.FP8
    return WeightQuant.INT8


@torch.no_grad()
def quantize_rows(weight: torch.Tensor, scheme: WeightQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., N, K] -> (q [..., N, K] in the scheme's dtype, scale [..., N] fp32), q * scale ~ w.

    Matrix by matrix, so the fp32 temporaries stay the size of one [N, K] matrix.
    """
    if weight.dim() > 2:
        q = torch.empty(weight.shape, dtype=scheme.dtype, device=weight.device)
        scale = torch.empty(weight.shape[:-1], dtype=torch.float32, device=weight.device)
        for i, matrix in enumerate(weight.flatten(0, -3)):
            q.view(-1, *q.shape[-2:])[i], scale.view(-1, scale.shape[-1])[i] = quantize_rows(matrix, scheme)
        return q, scale
    w = weight.float()
    amax = w.abs().amax(dim=-1)  # [N]
    scale = (amax / scheme.max_value).clamp_(min=1e-12)  # an all-zero row keeps scale > 0
    scaled = w / scale[:, None]  # not in place: w may be the caller's tensor
    if scheme is WeightQuant.INT8:
        q = scaled.round_().clamp_(-127, 127).to(torch.int8)
    else:
        q = scaled.clamp_(-scheme.max_value, scheme.max_value).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight q * scale represents, in `dtype` (for references and tests)."""
    return (q.float() * scale[..., None]).to(dtype)


def quantized_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (q * scale)^T [K, N] on the torch path.

    int8 on a CPU: torch's weight-only int8 kernel (`_weight_int8pack_mm`, AVX-512; bf16, fp16 or
    fp32 activations), which reads the 8-bit weight as it is. It computes row by row, so past
    `INT8_PACK_MAX_ROWS` rows of 16-bit activations the upcast GEMM is faster; fp32 activations
    keep it at every size, which keeps their results the same alone or in a batch. Elsewhere:
    upcast q, GEMM, then scale the columns (fp8 on a CPU, and the reference the kernels are
    checked against).
    """
    on_cpu_int8 = x.device.type == "cpu" and q.dtype == torch.int8 and x.dtype in _INT8_MM_DTYPES
    if on_cpu_int8 and (x.dtype == torch.float32 or x.shape[0] <= INT8_PACK_MAX_ROWS):
        return torch._weight_int8pack_mm(x, q, scale.to(x.dtype))
    return (torch.nn.functional.linear(x, q.to(x.dtype)).float() * scale).to(x.dtype)


_INT8_MM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# A decode step's 48 int8 matrices of the small checkpoint (bf16, 2 cores), `_weight_int8pack_mm`
# against upcast + GEMM, ms per pass: 1 row 2.05 / 5.68, 8 rows 4.73 / 6.36, 16 rows 8.18 / 8.02,
# 24 rows 11.96 / 9.25, 32 rows 15.57 / 10.45, 64 rows 29.48 / 15.58.
INT8_PACK_MAX_ROWS = 16


class QuantLinear(torch.nn.Module):
    """A bias-free linear layer stored in 8 bits with one fp32 scale per output row (int8 on a
    CPU: attention and the LM head, beside the experts)."""

    def __init__(self, weight: torch.Tensor, scheme: WeightQuant) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_rows(weight, scheme)
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.scale = torch.nn.Parameter(scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N]
        return quantized_linear(x, self.weight, self.scale)
