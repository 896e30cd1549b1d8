"""Greedy output through HTTP equals the engine's own output for the same request."""

from __future__ import annotations

import httpx

from engine.sampling_params import SamplingParams
from tests.engine.helpers import make_engine, run, text, tokens
from tests.server.conftest import MODEL
from tokenization import load_prompt_encoder, parse_messages

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Write a word."},
    {"role": "assistant", "content": "Word."},
    {"role": "user", "content": [{"type": "text", "text": "Another, please"}]},
]


def test_greedy_http_equals_engine(server, hf_dir):
    body = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 24}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers(), timeout=60)
    assert r.status_code == 200, r.text
    http = r.json()

    prompt = load_prompt_encoder(hf_dir).encode_chat(parse_messages(MESSAGES))
    outs = run(make_engine(hf_dir), {"x": (prompt, SamplingParams(temperature=0.0, max_tokens=24))})[("x", 0)]
    assert http["usage"]["prompt_tokens"] == len(prompt)
    assert http["usage"]["completion_tokens"] == len(tokens(outs))
    assert http["choices"][0]["message"]["content"] == text(outs)
    assert http["choices"][0]["finish_reason"] == outs[-1].finish_reason.value
