"""The shipped configs parse, and the Mixtral ones fit the GPUs they are written for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.memory import InsufficientMemoryError, check_fits, plan_memory
from model.parallel import Parallel
from model.quant import resolve_quant
from server.cli import parse_args
from server.settings import load_settings
from tests.engine.test_memory import MIXTRAL_8X7B

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GIB = 1024**3
# torch.cuda.mem_get_info()[1] of the cards (bytes): H100 80GB HBM3, H200.
H100, H200 = 85_520_809_984, 150_754_820_096


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(path):
    load_settings({}, path)


@pytest.mark.parametrize(
    ("name", "card", "expect_quant"),
    [("mixtral-8x7b-instruct", H200, "none"), ("mixtral-8x7b-instruct-8bit", H100, "8bit")],
)
def test_mixtral_configs_fit_their_card(name, card, expect_quant):
    s = load_settings({}, CONFIGS / f"{name}.yaml")
    assert s.quantization == expect_quant and s.device == "cuda"
    quant = resolve_quant(s.quantization, "cpu")  # on the GPU 8bit may pick fp8: same size
    plan = plan_memory(
        MIXTRAL_8X7B, torch.bfloat16, s.max_model_len, int(s.kv_cache_memory_gb * GIB), card, quant
    )
    check_fits(plan, s.device, torch.bfloat16)


def test_tp2_config_fits_two_h100_and_bf16_does_not_fit_one():
    s = load_settings({}, CONFIGS / "mixtral-8x7b-instruct-tp2.yaml")
    assert (s.tensor_parallel_size, s.quantization, s.dtype) == (2, "none", "bfloat16")
    kv = int(s.kv_cache_memory_gb * GIB)
    share = Parallel(0, 2)
    plan = plan_memory(MIXTRAL_8X7B, torch.bfloat16, s.max_model_len, kv, H100, parallel=share)
    check_fits(plan, s.device, torch.bfloat16)  # per rank: half the weights, half the kv heads
    assert plan.weights_bytes < 0.55 * plan_memory(MIXTRAL_8X7B, torch.bfloat16, 1, 0, H100).weights_bytes
    with pytest.raises(InsufficientMemoryError, match="tensor_parallel_size: 2"):
        check_fits(
            plan_memory(MIXTRAL_8X7B, torch.bfloat16, s.max_model_len, kv, H100), s.device, torch.bfloat16
        )


def test_quantization_and_kernel_flags():
    flags, _ = parse_args(["--quantization", "fp8", "--kernels", "torch", "--cuda-graph-max-batch", "0"])
    s = load_settings(flags)
    assert (s.quantization, s.kernels, s.cuda_graph_max_batch) == ("fp8", "torch", 0)
    with pytest.raises(SystemExit):
        parse_args(["--quantization", "int4"])
