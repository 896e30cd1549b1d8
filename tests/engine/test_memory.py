"""The memory check refuses configurations that cannot fit, before loading anything."""

from __future__ import annotations

import pytest
import torch

from engine.memory import InsufficientMemoryError, check_fits, plan_memory
from model.config import ModelConfig, MoEConfig
from model.quant import WeightQuant

MIXTRAL_8X7B = ModelConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    head_dim=128, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=32768, moe=MoEConfig(8, 2),
)  # fmt: skip
GB = 1e9


def test_mixtral_parameter_count_and_kv_size():
    assert MIXTRAL_8X7B.num_parameters() == pytest.approx(46.7e9, rel=0.005)
    plan = plan_memory(MIXTRAL_8X7B, torch.bfloat16, 1, 0, 0)
    assert plan.min_kv_bytes == 128 * 1024  # 128 KiB per token in bf16
    assert plan.weights_bytes / GB == pytest.approx(93.4, rel=0.005)


def test_mixtral_bf16_refused_on_80gb_and_accepted_on_141gb():
    on_h100 = plan_memory(MIXTRAL_8X7B, torch.bfloat16, 32768, int(10 * GB), int(80 * GB))
    with pytest.raises(
        InsufficientMemoryError, match=r"93\.4 GB of bfloat16 weights .* but the device has 80\.0 GB"
    ):
        check_fits(on_h100, "cuda:0", torch.bfloat16)
    check_fits(
        plan_memory(MIXTRAL_8X7B, torch.bfloat16, 32768, int(30 * GB), int(141 * GB)),
        "cuda:0",
        torch.bfloat16,
    )


def test_kv_pool_larger_than_what_is_left_is_refused():
    plan = plan_memory(MIXTRAL_8X7B, torch.bfloat16, 4096, int(60 * GB), int(141 * GB))
    with pytest.raises(InsufficientMemoryError, match="60.0 GB of KV cache"):
        check_fits(plan, "cuda:0", torch.bfloat16)


def test_context_longer_than_the_checkpoint_is_refused(hf_dir):
    from engine.factory import EngineSpec, build_engine
    from tokenization import load_prompt_encoder

    spec = EngineSpec(hf_dir, "float32", "cpu", 4096, 4, 256, 16, 1 << 20, True)
    with pytest.raises(ValueError, match="longer than the checkpoint's context"):
        build_engine(spec, load_prompt_encoder(hf_dir))


@pytest.mark.parametrize("quant", [WeightQuant.INT8, WeightQuant.FP8], ids=lambda q: q.value)
def test_mixtral_8bit_experts_fit_one_80gb_gpu_with_room_for_kv(quant):
    plan = plan_memory(MIXTRAL_8X7B, torch.bfloat16, 32768, int(24 * GB), int(80 * GB), quant)
    experts = MIXTRAL_8X7B.num_expert_parameters()
    assert experts / MIXTRAL_8X7B.num_parameters() == pytest.approx(0.966, abs=0.001)
    # 45.1 G expert weights at 1 byte + 1.6 G others at 2 bytes + a 4-byte scale per expert row
    assert plan.weights_bytes / GB == pytest.approx(48.3, abs=0.05)
    check_fits(plan, "cuda:0", torch.bfloat16)  # 48.3 + 24 GB of KV (~190k tokens) + 8% < 80 GB
    too_much_kv = plan_memory(MIXTRAL_8X7B, torch.bfloat16, 32768, int(30 * GB), int(80 * GB), quant)
    with pytest.raises(
        InsufficientMemoryError, match=rf"48\.3 GB of bfloat16 weights \({quant.value} experts\)"
    ):
        check_fits(too_much_kv, "cuda:0", torch.bfloat16)
