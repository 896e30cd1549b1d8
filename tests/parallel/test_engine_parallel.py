"""Tensor and expert parallelism over gloo on CPU: every split gives one rank's logits and tokens.

Each engine here is rank 0 of real worker processes (`engine.worker`), joined through
torch.distributed. The tiny checkpoint has 4 heads, 2 kv heads and 4 experts, so TP=4 replicates
each kv head on two ranks, and EP=4 puts one expert on each rank.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from engine.config import EngineArgs
from engine.factory import build_engine
from engine.sampling_params import SamplingParams
from tests.checkpoints import write_consolidated, write_hf_fused
from tests.conftest import SHAPE
from tests.engine.helpers import run, tokens
from tokenization.loader import load_prompt_encoder

PROMPTS = [list(range(3, 20)), [1, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000], list(range(50, 90, 3))]
# Greedy, with prompt logprobs for one request (its rows are computed on every rank, too).
REQUESTS = {
    f"r{i}": (
        p,
        SamplingParams(
            temperature=0.0, max_tokens=10, ignore_eos=True, prompt_logprobs=1 if i == 0 else None
        ),
    )
    for i, p in enumerate(PROMPTS)
}


def engine(path, tp=1, ep=False, quantization="none"):
    args = EngineArgs(
        dtype="float32",
        max_model_len=128,
        kv_cache_memory_gb=0.005,
        block_size=8,
        max_num_seqs=8,
        tensor_parallel_size=tp,
        expert_parallel=ep,
        quantization=quantization,
        collective_timeout_s=30,
        kernels="torch",  # one rank too: the ranks' path (a CPU's native step is one rank's only)
    )
    built, _ = build_engine(path, args, load_prompt_encoder(path))
    return built


def logits_and_tokens(built):
    """Run REQUESTS; every step's logits as rank 0 saw them, and each request's tokens."""
    seen = []
    forward = built.runner.forward

    def recording(chunks, prompt_rows, sample_rows):
        prompt, sampled = forward(chunks, prompt_rows, sample_rows)
        seen.append(torch.cat([t for t in (prompt, sampled) if t is not None]).clone())
        return prompt, sampled

    built.runner.forward = recording
    try:
        outs = run(built, REQUESTS)
    finally:
        built.close()
    return seen, {k: tokens(v) for k, v in outs.items()}


@pytest.fixture(scope="module")
def layouts(oracle, hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    fused = write_hf_fused(oracle, root / "fused")
    shutil.copy(hf_dir / "tokenizer.model", fused)
    return {
        "hf": hf_dir,
        "hf-fused": fused,
        "consolidated": write_consolidated(oracle, SHAPE, root / "cons", stacked=False),
        "consolidated-pth": write_consolidated(oracle, SHAPE, root / "pth", stacked=True),
    }


@pytest.fixture(scope="module")
def one_rank(layouts):
    return {
        name: logits_and_tokens(engine(path))
        for name, path in layouts.items()
        if name in ("hf", "consolidated")
    }


@pytest.mark.parametrize(
    ("layout", "tp", "ep"),
    [
        ("hf", 2, False),
        ("hf", 4, False),  # 2 kv heads over 4 ranks: each replicated twice
        ("hf", 2, True),
        ("hf", 4, True),  # one expert per rank
        ("consolidated", 2, False),
        ("consolidated", 4, True),
    ],
    ids=lambda v: str(v),
)
def test_split_matches_one_rank(layouts, one_rank, layout, tp, ep):
    want_logits, want_tokens = one_rank[layout]
    got_logits, got_tokens = logits_and_tokens(engine(layouts[layout], tp, ep))
    assert got_tokens == want_tokens
    assert len(got_logits) == len(want_logits)
    for got, want in zip(got_logits, want_logits, strict=True):
        assert got.shape == want.shape  # rank 0 gathers the whole vocabulary
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # fp32 partial sums, reordered


@pytest.mark.parametrize("layout", ["hf-fused", "consolidated-pth"])
def test_split_reads_fused_and_stacked_experts(layouts, one_rank, layout):
    """The fused gate_up tensor and the 2023 stacked experts, each read as a rank's two parts."""
    want_logits, want_tokens = one_rank["hf"]
    got_logits, got_tokens = logits_and_tokens(engine(layouts[layout], 2))
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)  # as the one-rank layouts agree


SPLITS_8BIT = {"tp2-int8": (False, "int8"), "ep2-int8": (True, "int8"), "ep2-fp8": (True, "fp8")}


@pytest.mark.parametrize(("ep", "scheme"), SPLITS_8BIT.values(), ids=SPLITS_8BIT.keys())
def test_8bit_weights_split(hf_dir, one_rank, ep, scheme):
    """8-bit weights sharded: each rank quantizes its own slices row by row.
    - fp8 on a CPU quantizes the experts alone; under EP a rank holds whole experts, so its rows
      are one rank's rows and the result is one rank's, exactly.
    - int8 on a CPU quantizes attention and the LM head too. Row-parallel matrices (the output
      projection, and under TP each expert's down projection) are split along their rows, so a
      rank's scales cover part of a row: a different rounding of the same weights, within one
      rank's 8-bit error. The tokens may then part from one rank's, so these are compared on the
      first step (the prefill, the same input on both)."""
    fp32_logits, _ = one_rank["hf"]
    one_logits, one_tokens = logits_and_tokens(engine(hf_dir, quantization=scheme))
    got_logits, got_tokens = logits_and_tokens(engine(hf_dir, 2, ep, quantization=scheme))
    quant_error = (one_logits[0] - fp32_logits[0]).abs().max().item()
    assert quant_error > 1e-3  # the weights really are 8-bit
    split_error = (got_logits[0] - one_logits[0]).abs().max().item()
    if scheme == "fp8":
        assert got_tokens == one_tokens
        for got, want in zip(got_logits, one_logits, strict=True):
            # The same weights; only fp32 sums are added in another order (measured: 1.4e-5).
            torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)
    else:
        assert 0 < split_error <= quant_error
