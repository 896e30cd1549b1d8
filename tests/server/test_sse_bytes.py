"""The exact SSE bytes of a chat stream (API.md, "Streaming")."""

from __future__ import annotations

import json

import httpx

from tests.server.conftest import MODEL

MESSAGES = [{"role": "user", "content": "Count to three."}]


def stream(server, **body) -> tuple[httpx.Headers, bytes]:
    payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True} | body
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=payload, headers=server.headers(), timeout=60
    ) as r:
        assert r.status_code == 200
        return r.headers, r.read()


def events(raw: bytes) -> list[str]:
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n")
    parts = [p for p in text.split("\n\n") if p and not p.startswith(":")]  # ": ping" comments allowed
    assert all(p.startswith("data: ") and "\n" not in p for p in parts), parts[:3]
    return [p[len("data: ") :] for p in parts]


def test_mistral_style_stream(server):
    headers, raw = stream(server)
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    data = events(raw)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and {"id", "created", "model"} <= c.keys()
        assert all("finish_reason" in ch for ch in c["choices"])
    final = [c for c in chunks if c["choices"][0]["finish_reason"] is not None]
    assert len(final) == 1 and final[0] is chunks[-1]
    assert final[0]["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])


def test_openai_usage_chunk(server):
    chunks = [json.loads(d) for d in events(stream(server, stream_options={"include_usage": True})[1])[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])


def test_n_choices_interleave_with_their_index(server):
    chunks = [json.loads(d) for d in events(stream(server, n=2, temperature=1.0, seed=2)[1])[:-1]]
    indexes = [c["choices"][0]["index"] for c in chunks]
    assert set(indexes) == {0, 1}
    finals = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finals) == [0, 1]


def test_request_id_echoed_or_generated(server):
    r = httpx.get(f"{server.url}/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = httpx.get(f"{server.url}/health").headers["x-request-id"]
    assert len(generated) >= 16
