"""Memory: the check that refuses configurations that cannot fit, before loading anything, and
the KV pool sized from a device's memory (a probe stands in for a GPU's)."""

from __future__ import annotations

import pytest
import torch

from engine.config import CPU_KV_CACHE_GB, EngineArgs
from engine.factory import build_engine, kv_cache_budget
from engine.memory import InsufficientMemoryError, check_fits, kv_pool_bytes, plan_memory
from model.config import ModelConfig, MoEConfig
from model.loader import load_model
from model.mixtral import kv_cache_bytes_per_token
from model.quant import WeightQuant
from tokenization import load_prompt_encoder

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
    args = EngineArgs(dtype="float32", max_model_len=4096, max_num_seqs=4, kv_cache_memory_gb=0.001)
    with pytest.raises(ValueError, match="longer than the checkpoint's context"):
        build_engine(hf_dir, args, load_prompt_encoder(hf_dir))


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


GIB = 1024**3


class FakeDevice:
    """A `MemoryProbe` of a device with `total` bytes, whose peak during the profile is `peak`
    (weights, activations, the profile's own small KV pool: what a GPU's allocator would report)."""

    def __init__(self, total: int, peak: int) -> None:
        self.total, self.peak = total, peak
        self.resets = 0

    def total_bytes(self) -> int:
        return self.total

    def reset_peak(self) -> None:
        self.resets += 1

    def peak_bytes(self) -> int:
        return self.peak


def test_the_kv_pool_is_what_the_utilization_leaves_after_the_largest_step(hf_dir):
    model = load_model(hf_dir, dtype="float32")
    probe = FakeDevice(total=10 * GIB, peak=2 * GIB)
    args = EngineArgs(gpu_memory_utilization=0.5, max_num_batched_tokens=64, max_num_seqs=4)
    # The profile ran 4 sequences of 16 tokens, one 16-token block each: that pool is not in use later.
    profile_pool = 4 * 16 * kv_cache_bytes_per_token(model.config, torch.float32)
    assert kv_cache_budget(model, args, probe) == 5 * GIB - (2 * GIB - profile_pool)
    assert probe.resets == 1  # the peak was measured around one forward of the largest step
    assert kv_cache_budget(model, EngineArgs(kv_cache_memory_gb=0.25), probe) == GIB // 4  # explicit wins
    assert kv_cache_budget(model, EngineArgs(), None) == int(CPU_KV_CACHE_GB * GIB)  # a CPU: the setting
    with pytest.raises(InsufficientMemoryError, match="no room for a KV cache"):
        kv_cache_budget(model, args, FakeDevice(total=4 * GIB, peak=3 * GIB))


def test_kv_pool_bytes():
    assert kv_pool_bytes(100, 0.9, 40) == 50
    with pytest.raises(InsufficientMemoryError):
        kv_pool_bytes(100, 0.9, 90)


def test_an_engine_built_on_a_probed_device_gets_that_pool(hf_dir):
    probe = FakeDevice(total=GIB, peak=GIB // 4)
    args = EngineArgs(dtype="float32", max_num_seqs=4, max_num_batched_tokens=64, gpu_memory_utilization=0.5)
    engine, info = build_engine(hf_dir, args, load_prompt_encoder(hf_dir), probe=probe)
    per_block = kv_cache_bytes_per_token(engine.runner.model.config, torch.float32) * args.block_size
    budget = GIB // 2 - (GIB // 4 - 4 * per_block)  # the profile pool: 4 blocks
    assert engine.config.num_kv_blocks == budget // per_block
    assert info.kv_cache_bytes == engine.config.num_kv_blocks * per_block
    assert engine.config.max_model_len == 512  # the checkpoint's context: the pool holds far more


def test_the_profile_step_never_outgrows_the_context(hf_dir):
    """One sequence per step and the default 2,048-token budget on a 512-token checkpoint: the
    profiled step is one 512-token prefill (positions past the context would crash rotary)."""
    model = load_model(hf_dir, dtype="float32")
    probe = FakeDevice(total=GIB, peak=GIB // 8)
    args = EngineArgs(max_num_seqs=1)
    assert kv_cache_budget(model, args, probe) > GIB // 2 - GIB // 8  # ran, and got its pool
    assert probe.resets == 1


def test_engine_args_check_their_choices():
    for bad in ({"kernels": "cuda"}, {"quantization": "int4"}, {"dtype": "fp64"}, {"device": "tpu"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineArgs(**bad)
