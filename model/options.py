"""What a deployment chooses about the model's numbers and kernels, as types: the one place the
choices are spelled. Settings, the CLI's flags and the model all read them from here. No torch.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

DType = Literal["bfloat16", "float16", "float32"]
# auto: Triton on CUDA; on a CPU the native decode step where it builds (model.native), torch
# for the rest. native: that step, or refuse to start. torch: the reference path everywhere.
KernelChoice = Literal["auto", "torch", "triton", "native"]
Quantization = Literal["none", "8bit", "int8", "fp8"]  # of the experts' weights (model.quant)


def choices(alias: Any) -> tuple[str, ...]:
    """The values of a `Literal` alias above."""
    return get_args(alias)
