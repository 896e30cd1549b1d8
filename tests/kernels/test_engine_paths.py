"""End to end: the engine's greedy tokens are the same on the torch path and the Triton path."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import Engine
from model.cuda_graphs import DecodeGraphs
from model.loader import load_model
from model.ops import select_kernels
from model.triton_backend import paged_attention
from tests.engine.helpers import EOS, greedy, run, tokens
from tests.kernels.conftest import DEVICE, FP32_TOL
from tests.model.paged import PagedHarness
from tests.model.test_against_transformers import PROMPTS
from tokenization.loader import load_prompt_encoder

# Ragged prompts (the longest spans several 16-slot blocks) and enough steps to cross block edges.
REQUESTS = {f"r{i}": (p, greedy(12)) for i, p in enumerate(PROMPTS + [list(range(3, 40))])}


class counted:
    """A Triton kernel whose launches record (NUM_SPLITS, block-table width) in `launches`."""

    def __init__(self, kernel, launches: list[tuple[int, int]]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((kwargs["NUM_SPLITS"], args[2].shape[1]))  # args[2]: block tables
            return self.kernel[grid](*args, **kwargs)

        return launch


def engine(hf_dir, kernels: str, quantization: str | None = None) -> Engine:
    model = load_model(hf_dir, dtype="float32", device=DEVICE, quantization=quantization)
    config = EngineConfig(
        max_model_len=128, num_kv_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=48,
        kernels=kernels,
    )  # fmt: skip
    return Engine(model, config, load_prompt_encoder(hf_dir), eos_token_id=EOS)


@pytest.mark.parametrize("quantization", [None, "int8", "fp8"], ids=["fp32", "int8", "fp8"])
def test_greedy_tokens_equal_on_both_paths(hf_dir, quantization):
    """48-token budget: prompts are chunked, decodes and prefill chunks share steps."""
    triton_engine = engine(hf_dir, "triton", quantization)
    assert triton_engine.runner.model.kernels.name == "triton"
    got = run(triton_engine, REQUESTS)
    expected = run(engine(hf_dir, "torch", quantization), REQUESTS)
    assert {k: tokens(v) for k, v in got.items()} == {k: tokens(v) for k, v in expected.items()}


def test_logits_equal_on_both_paths(hf_dir):
    """Teacher-forced logits through prefill, chunked prefill and decode steps, within fp32 noise."""
    models = {}
    for kernels in ("torch", "triton"):
        model = load_model(hf_dir, dtype="float32", device=DEVICE)
        model.use_kernels(select_kernels(kernels, DEVICE))
        models[kernels] = PagedHarness(model, block_size=16)
    for step in (
        [(0, PROMPTS[0]), (1, PROMPTS[1][:5])],
        [(0, [11]), (1, PROMPTS[1][5:])],
        [(0, [12]), (1, [13])],
    ):
        ref, got = (models[k].step(step) for k in ("torch", "triton"))
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, atol=max(1e-4, FP32_TOL["atol"]), rtol=0)


@pytest.mark.parametrize("split_kv", [False, True], ids=["one-pass", "split-kv"])
def test_decode_graph_buffers_and_padding_keep_tokens_equal(hf_dir, monkeypatch, split_kv):
    """The CUDA-graph runner's static buffers and padding rows (slot -1, length 0), replayed eagerly
    on CPU: decode batches of 1-5 sequences run padded to 2, 4 or 8 rows, and the tokens stay the
    torch path's. A padding row that wrote its KV (slot 0) or read a stale block would change them.
    split-kv: decode attention sized as for an H100 (132 SMs), one block per split."""
    if split_kv:
        monkeypatch.setattr(paged_attention, "sm_count", lambda device: 132)
        monkeypatch.setattr(paged_attention, "MIN_BLOCKS_PER_SPLIT", 1)
        launches = []
        monkeypatch.setattr(
            paged_attention, "_decode_kernel", counted(paged_attention._decode_kernel, launches)
        )
    triton_engine = engine(hf_dir, "triton")
    runner = triton_engine.runner
    graphs = DecodeGraphs(
        runner.model, runner.forward.kv_cache, runner.config.max_blocks_per_seq, [2, 4, 8], False
    )
    graphs.capture()
    runner.forward.graphs = graphs
    padded: list[int] = []
    run_graph = graphs.run

    def counting_run(input_ids, meta):
        padded.append(graphs.padded_size(meta.num_decodes) - meta.num_decodes)
        return run_graph(input_ids, meta)

    graphs.run = counting_run
    got = run(triton_engine, REQUESTS)
    expected = run(engine(hf_dir, "torch"), REQUESTS)
    assert {k: tokens(v) for k, v in got.items()} == {k: tokens(v) for k, v in expected.items()}
    assert len(padded) >= 5 and any(padded)  # decode-only steps went through the buffers, some padded
    if split_kv:
        # Every decode launch split its contexts as widely as its block table allows (one block
        # per split): replays of graphs (tables 8 blocks wide) 8 ways, eager steps (tables as
        # wide as their longest context) fewer, but more than one once a context spans 2 blocks.
        assert all(splits == 1 << (width.bit_length() - 1) for splits, width in launches)
        assert (8, 8) in launches and any(1 < splits < 8 for splits, _ in launches)
