"""What a deployment chooses about the model's numbers and kernels, as types: the one place the
choices are spelled. Settings, the CLI's flags and the model all read them from here. No torch.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

DType = Literal["bfloat16", "float16", "float32"]
KernelChoice = Literal["auto", "torch", "triton"]  # auto: Triton on CUDA, torch elsewhere (model.ops)
Quantization = Literal["none", "8bit", "int8", "fp8"]  # of the experts' weights (model.quant)


def choices(alias: Any) -> tuple[str, ...]:
    """The values of a `Literal` alias above."""
    return get_args(alias)
