"""Our Mixtral against transformers' on the same checkpoint: logits and greedy tokens."""

from __future__ import annotations

import json

import torch

from model.checkpoint_layouts import Layout, layout_names
from model.config import load_config
from model.loader import load_model
from tests.checkpoints import published_mixtral_keys
from tests.conftest import SHAPE
from tests.model.paged import PagedHarness

PROMPTS = [
    [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793],
    [1, *range(100, 131)],
    [1, 415, 5565, 302, 4843, 349],
    [1, *range(2000, 2000 + 47)],
]


def oracle_logits(oracle, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return oracle(torch.tensor([prompt])).logits[0]  # [L, V]


def test_saved_checkpoint_has_the_published_key_set(hf_dir):
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    saved = set(index["weight_map"])
    expected = published_mixtral_keys(SHAPE.num_layers, SHAPE.num_experts)
    assert saved == expected
    assert len(set(index["weight_map"].values())) > 1, "fixture should be sharded"
    assert set(layout_names(load_config(hf_dir), Layout.HF)) == expected


def test_batched_prefill_logits_match_transformers(oracle, hf_dir):
    model = load_model(hf_dir, dtype="float32")
    logits = PagedHarness(model, block_size=5).prefill(PROMPTS)
    for prompt, ours in zip(PROMPTS, logits, strict=True):
        ref = oracle_logits(oracle, prompt)
        assert ours.shape == ref.shape
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_greedy_32_tokens_through_paged_cache_match_transformers(oracle, hf_dir):
    model = load_model(hf_dir, dtype="float32")
    ours = PagedHarness(model, num_blocks=96, block_size=7).greedy(PROMPTS, steps=32)
    for prompt, toks in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            ref = oracle.generate(
                torch.tensor([prompt]),
                max_new_tokens=32,
                do_sample=False,
                min_new_tokens=32,
                eos_token_id=None,
            )[0, len(prompt) :]
        assert toks == ref.tolist()


def test_token_by_token_and_chunked_prefill_equal_full_prefill(hf_dir):
    model = load_model(hf_dir, dtype="float32")
    prompt = PROMPTS[1]
    full = PagedHarness(model, block_size=4).prefill([prompt])[0]

    stepwise = PagedHarness(model, block_size=4, seed=1)
    by_token = torch.cat([stepwise.step([(0, [t])])[0] for t in prompt])
    torch.testing.assert_close(by_token, full, atol=1e-4, rtol=0)

    chunked = PagedHarness(model, block_size=4, seed=2)
    pieces, start = [], 0
    for size in (3, 10, 1, 9, 9):  # chunk boundaries fall inside blocks
        pieces.append(chunked.step([(0, prompt[start : start + size])])[0])
        start += size
    assert start == len(prompt)
    torch.testing.assert_close(torch.cat(pieces), full, atol=1e-4, rtol=0)


def test_mixed_batch_of_decodes_and_chunks_matches_separate_runs(hf_dir):
    """Decodes of some sequences and prefill chunks of others in the same step."""
    model = load_model(hf_dir, dtype="float32")
    mixed = PagedHarness(model, block_size=3)
    mixed.step([(0, PROMPTS[0]), (1, PROMPTS[1][:10])])
    out = mixed.step([(1, PROMPTS[1][10:]), (0, [42]), (2, PROMPTS[2])])
    alone = [
        PagedHarness(model, block_size=8).prefill([PROMPTS[1]])[0][10:],
        PagedHarness(model, block_size=8).prefill([[*PROMPTS[0], 42]])[0][-1:],
        PagedHarness(model, block_size=8).prefill([PROMPTS[2]])[0],
    ]
    for got, ref in zip(out, alone, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_cpu_prepacked_weights_give_the_same_logits(oracle, hf_dir):
    model = load_model(hf_dir, dtype="float32")
    plain = PagedHarness(model, block_size=5).prefill(PROMPTS)
    assert model.pack_for_cpu()
    packed = PagedHarness(model, block_size=5).prefill(PROMPTS)
    for prompt, got, ref in zip(PROMPTS, packed, plain, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(got, oracle_logits(oracle, prompt), atol=1e-4, rtol=0)
