"""The native CPU decode step (`model.native`) against the torch path, the reference it replaces.

Every comparison runs the same paged cache schedule (shuffled, interleaved blocks, free blocks
NaN-filled before each forward) through both paths, teacher-forced on the same tokens.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from engine.config import EngineConfig
from engine.llm_engine import Engine
from model.loader import load_model
from model.native import build
from model.native.build import load_native
from model.native.decoder import NativeDecoder
from model.native.linear import NativeLinear
from model.quant import WeightQuant, dequantize_rows, quantize_rows
from tests.checkpoints import V1_TOKENIZER, TinyShape, hf_dense
from tests.engine.helpers import EOS, greedy, run, tokens
from tests.model.paged import PagedHarness
from tests.model.test_against_transformers import PROMPTS
from tokenization.loader import load_prompt_encoder

LIB = load_native()
pytestmark = pytest.mark.skipif(isinstance(LIB, str), reason=f"no native CPU step here: {LIB}")
STEPS = 12  # decode steps after the prefill: crosses several 5-slot block edges


def native_model(path, dtype: str):
    model = load_model(path, dtype=dtype)
    decoder = NativeDecoder.create(model)
    assert not isinstance(decoder, str), decoder
    return model, decoder


def teacher_forced(paths: dict[str, PagedHarness], prompts: list[list[int]], steps: int):
    """Logits [S, V] of every path at the prefill's last tokens and at each decode step, all paths
    fed the first path's greedy tokens."""
    logits = {name: [] for name in paths}
    last = {}
    for name, h in paths.items():
        last[name] = torch.stack([lg[-1] for lg in h.prefill(prompts)])
        logits[name].append(last[name].float())
    lead = next(iter(paths))
    for _ in range(steps):
        feed = last[lead].argmax(-1).tolist()
        for name, h in paths.items():
            last[name] = torch.cat(h.step([(i, [t]) for i, t in enumerate(feed)]))
            logits[name].append(last[name].float())
    return {name: torch.stack(v) for name, v in logits.items()}  # [steps + 1, S, V]


def test_fp32_decode_equals_the_torch_step(hf_dir):
    torch_model = load_model(hf_dir, dtype="float32")
    model, decoder = native_model(hf_dir, "float32")
    got = teacher_forced(
        {"torch": PagedHarness(torch_model), "native": PagedHarness(model, decoder=decoder)}, PROMPTS, STEPS
    )
    # Same fp32 sums in another order (GEMM blocking, attention): measured at most 1.1e-5 on logits
    # up to 8.3 (1.3e-6 relative), as the TP test's ranks differ from one rank.
    torch.testing.assert_close(got["native"], got["torch"], atol=2e-5, rtol=1e-5)
    assert (got["native"].argmax(-1) == got["torch"].argmax(-1)).all()


def test_bf16_decode_is_no_further_from_fp32_than_the_torch_step(hf_dir):
    """The native step keeps the residual stream and everything between GEMMs in fp32, rounding
    only GEMM inputs and the cache to bf16; its error against fp32 is at most the torch path's."""
    reference = PagedHarness(load_model(hf_dir, dtype="float32"))
    torch_bf16 = PagedHarness(load_model(hf_dir, dtype="bfloat16"))
    model, decoder = native_model(hf_dir, "bfloat16")
    got = teacher_forced(
        {"fp32": reference, "torch": torch_bf16, "native": PagedHarness(model, decoder=decoder)},
        PROMPTS,
        STEPS,
    )
    decode = slice(1, None)  # the prefill rows ran the torch path's operators in both
    err = {k: (got[k][decode] - got["fp32"][decode]).abs().mean().item() for k in ("torch", "native")}
    assert err["native"] <= 1.1 * err["torch"], err
    assert torch.isfinite(got["native"]).all()


@pytest.mark.parametrize("tie", [False, True])
def test_dense_model_decode_equals_the_torch_step(tmp_path, tie):
    """No router: one expert, every token at weight 1; GQA 4:1; tied embeddings."""
    hf_dense("llama", TinyShape(num_layers=2, num_kv_heads=1), tie=tie).save_pretrained(tmp_path)
    model, decoder = native_model(tmp_path, "float32")
    assert model.config.moe is None
    got = teacher_forced(
        {
            "torch": PagedHarness(load_model(tmp_path, dtype="float32")),
            "native": PagedHarness(model, decoder=decoder),
        },
        PROMPTS,
        STEPS,
    )
    torch.testing.assert_close(got["native"], got["torch"], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 5, 6, 7, 13, 300])
def test_native_linear_equals_f_linear(dtype, rows):
    """Every row and block tail of the GEMM's tiles (6 rows x 4 blocks of 16 outputs)."""
    g = torch.Generator().manual_seed(rows)
    weight = (torch.randn(80, 96, generator=g) / 8).to(dtype)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    got = NativeLinear(weight, LIB, threads=2)(x)
    want = F.linear(x.float(), weight.float())
    assert got.dtype == dtype and got.shape == (rows, 80)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_unsupported_model_says_why(tmp_path):
    hf_dense("mistral", TinyShape(num_layers=1, head_dim=24)).save_pretrained(tmp_path)
    reason = NativeDecoder.create(load_model(tmp_path, dtype="float32"))
    assert isinstance(reason, str) and "head_dim 24" in reason
    reason = NativeDecoder.create(load_model(tmp_path, dtype="float16"))
    assert isinstance(reason, str) and "float16" in reason


def engine(path, kernels: str) -> Engine:
    model = load_model(path, dtype="float32")
    config = EngineConfig(
        max_model_len=128, num_kv_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=48,
        kernels=kernels,
    )  # fmt: skip
    return Engine(model, config, load_prompt_encoder(path), eos_token_id=EOS)


def test_engine_greedy_tokens_equal_on_the_native_and_torch_steps(hf_dir):
    """48-token budget: chunked prompts share steps with decodes (the torch path on the native
    packed weights), and the all-decode steps take the native step."""
    requests = {f"r{i}": (p, greedy(16)) for i, p in enumerate(PROMPTS + [list(range(3, 40))])}
    native = engine(hf_dir, "native")
    assert native.runner.forward.native is not None
    assert engine(hf_dir, "torch").runner.forward.native is None
    got = run(native, requests)
    expected = run(engine(hf_dir, "torch"), requests)
    assert {k: tokens(v) for k, v in got.items()} == {k: tokens(v) for k, v in expected.items()}


def test_kernels_native_refuses_a_model_it_cannot_run_and_auto_falls_back(tmp_path):
    hf_dense("mistral", TinyShape(num_layers=1, head_dim=24)).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(V1_TOKENIZER.read_bytes())
    with pytest.raises(RuntimeError, match="head_dim 24"):
        engine(tmp_path, "native")
    assert engine(tmp_path, "auto").runner.forward.native is None


@pytest.mark.parametrize("rows", [1, 7, 40])
def test_native_int8_linear_equals_the_dequantized_weight(rows):
    """W8A16: the int8 weight widened in registers, the row's fp32 scale applied to the sums."""
    g = torch.Generator().manual_seed(rows)
    q, scale = quantize_rows(torch.randn(64, 96, generator=g), WeightQuant.INT8)
    x = torch.randn(rows, 96, generator=g).bfloat16()
    got = NativeLinear(q, LIB, threads=2, scale=scale)(x)
    want = F.linear(x.float(), dequantize_rows(q, scale, torch.float32))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2)  # the bf16 output's rounding


def test_int8_decode_is_no_further_from_fp32_than_the_torch_step(hf_dir):
    """int8 everywhere but the router (`--quantization int8` on a CPU), bf16 activations."""
    reference = PagedHarness(load_model(hf_dir, dtype="float32"))
    torch_int8 = PagedHarness(load_model(hf_dir, dtype="bfloat16", quantization="int8"))
    model = load_model(hf_dir, dtype="bfloat16", quantization="int8")
    decoder = NativeDecoder.create(model)
    assert not isinstance(decoder, str), decoder
    got = teacher_forced(
        {"fp32": reference, "torch": torch_int8, "native": PagedHarness(model, decoder=decoder)},
        PROMPTS,
        STEPS,
    )
    decode = slice(1, None)
    err = {k: (got[k][decode] - got["fp32"][decode]).abs().mean().item() for k in ("torch", "native")}
    assert err["native"] <= 1.1 * err["torch"], err


def test_out_of_range_token_is_an_index_error_not_a_wild_read(hf_dir):
    """The torch path's embedding raises IndexError; the native step checks before its unchecked read."""
    model, decoder = native_model(hf_dir, "float32")
    harness = PagedHarness(model, decoder=decoder)
    harness.prefill([PROMPTS[0]])
    with pytest.raises(IndexError, match="embedding"):
        harness.step([(0, [model.config.vocab_size])])


def test_without_a_compiler_auto_logs_why_and_runs_the_torch_step(hf_dir, monkeypatch, caplog):
    monkeypatch.setattr(build, "_loaded", None)  # forget this process's library
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with caplog.at_level(logging.INFO, logger="engine.forward"):
        fallback = engine(hf_dir, "auto")
    assert fallback.runner.forward.native is None
    assert "CPU decode: the torch step, because no C++ compiler (g++) on PATH" in caplog.text
    with pytest.raises(RuntimeError, match="no C..? compiler"):
        engine(hf_dir, "native")
    requests = {"r": (PROMPTS[1], greedy(8))}
    assert tokens(run(fallback, requests)[("r", 0)]) == tokens(
        run(engine(hf_dir, "torch"), requests)[("r", 0)]
    )
