"""Triton kernel tests: on a GPU when there is one, else on CPU under Triton's interpreter."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 to run the kernel tests on CPU"

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter's tl.dot is wrong on bf16 operands (DESIGN.md): bf16 runs with fp32 dots there.
UPCAST = DEVICE.type == "cpu"
# fp32 comparisons: exact dots on CPU; on a GPU, tl.dot on fp32 operands runs in tf32 (10-bit mantissa).
FP32_TOL = {"atol": 1e-5, "rtol": 1e-4} if DEVICE.type == "cpu" else {"atol": 5e-3, "rtol": 5e-3}


@pytest.fixture
def device():
    return DEVICE
