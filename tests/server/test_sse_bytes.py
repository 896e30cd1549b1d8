"""The exact SSE bytes of a chat stream (API.md, "Streaming"), read with raw httpx."""

from __future__ import annotations

import json

import httpx

from engine.outputs import RequestOutput
from engine.request import FinishReason
from tests.server.conftest import MODEL
from tests.server.test_admission import BODY, FakeEngine, app_with

MESSAGES = [{"role": "user", "content": "Count to three."}]
CHAT = "/v1/chat/completions"


def stream(server, headers: dict | None = None, **body) -> tuple[httpx.Headers, bytes]:
    payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True} | body
    with httpx.stream(
        "POST", f"{server.url}{CHAT}", json=payload, headers=server.headers() | (headers or {}), timeout=60
    ) as r:
        assert r.status_code == 200, r.read()[:500]
        return r.headers, r.read()


def events(raw: bytes) -> list[str]:
    """The `data` payloads, checking the framing: `data: <payload>\\n\\n`, nothing else."""
    text = raw.decode("utf-8")
    assert "\r" not in text
    assert text.startswith("data: {") and text.endswith("\n\ndata: [DONE]\n\n")
    assert text.count("data: [DONE]") == 1
    parts = text.split("\n\n")
    assert parts[-1] == ""  # every event, the last included, ends with a blank line
    parts = [p for p in parts[:-1] if not p.startswith(": ")]  # sse-starlette's `: ping` comments
    for p in parts:
        assert p.startswith("data: ") and not p.startswith("data:  "), p[:80]  # exactly one space
        assert "\n" not in p, p[:80]  # one line per event
    return [p[len("data: ") :] for p in parts]


def chunks_of(raw: bytes) -> list[dict]:
    data = events(raw)
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_headers(server):
    headers, _ = stream(server)
    assert headers["content-type"].split(";")[0] == "text/event-stream"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"


def test_mistral_style_stream(server):
    chunks = chunks_of(stream(server)[1])
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
    ]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == MODEL
        assert isinstance(c["created"], int)
        assert len(c["choices"]) == 1
        assert "finish_reason" in c["choices"][0]  # the key on every chunk, null allowed
        assert "usage" in c
    for c in chunks[1:-1]:
        assert isinstance(c["choices"][0]["delta"]["content"], str) and c["choices"][0]["delta"]["content"]
        assert c["choices"][0]["finish_reason"] is None and c["usage"] is None
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    usage = final["usage"]  # Mistral style: usage rides on the chunk that carries finish_reason
    assert usage["completion_tokens"] == 6 or final["choices"][0]["finish_reason"] == "stop"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert chunks[0]["usage"] is None


def test_stream_text_equals_non_stream(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    full = httpx.post(f"{server.url}{CHAT}", json=body, headers=server.headers(), timeout=60).json()
    chunks = chunks_of(stream(server)[1])
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == full["usage"]


def test_openai_style_usage_chunk(server):
    chunks = chunks_of(stream(server, stream_options={"include_usage": True})[1])
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["total_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])  # also the chunk with finish_reason
    with_reason = [c for c in chunks[:-1] if c["choices"][0]["finish_reason"] is not None]
    assert len(with_reason) == 1 and with_reason[0] is chunks[-2]


def test_n_choices_interleave_with_their_index(server):
    chunks = chunks_of(stream(server, n=2, temperature=1.0, seed=2, max_tokens=8, ignore_eos=True)[1])
    assert all(len(c["choices"]) == 1 for c in chunks)
    indexes = [c["choices"][0]["index"] for c in chunks]
    assert sorted(indexes[:2]) == [0, 1]  # a role chunk per choice first
    assert all(c["choices"][0]["delta"] == {"role": "assistant", "content": ""} for c in chunks[:2])
    # Interleaved, not one choice after the other: choice 1 speaks before choice 0 is done.
    assert indexes.index(1, 2) < max(i for i, x in enumerate(indexes) if x == 0)
    finals = [c for c in chunks if c["choices"][0]["finish_reason"] is not None]
    assert sorted(c["choices"][0]["index"] for c in finals) == [0, 1]
    with_usage = [c for c in chunks if c["usage"] is not None]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1]
    assert with_usage[0]["usage"]["completion_tokens"] == 16  # both choices counted


def test_error_before_the_first_token_is_plain_http(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100_000, "stream": True}
    r = httpx.post(f"{server.url}{CHAT}", json=body, headers=server.headers(), timeout=60)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_request_id_echoed_or_generated(server):
    headers, _ = stream(server, headers={"X-Request-Id": "my-trace-42"})
    assert headers["x-request-id"] == "my-trace-42"
    generated = stream(server)[0]["x-request-id"]
    assert len(generated) >= 16 and generated != "my-trace-42"
    other = httpx.get(f"{server.url}/health").headers["x-request-id"]
    assert other != generated  # one per request
    # Errors carry one too, even those answered by the middleware (401) before any route.
    unauthorized = httpx.get(f"{server.url}/v1/models", headers={"X-Request-Id": "e-1"})
    assert unauthorized.status_code == 401 and unauthorized.headers["x-request-id"] == "e-1"


# U+0085 (NEL), U+2028 and U+2029: JSON may hold them raw, but httpx's `iter_lines` (so the SDKs'
# stream readers) breaks lines at them, as Python's `str.splitlines` does.
LINE_BREAKERS = "a\u0085b\u2028c\u2029d"


def data_lines(r: httpx.Response) -> list[dict]:
    """Each `data:` line as the SDKs read it: line by line through httpx, each line one JSON."""
    out = []
    for line in r.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[len("data: ") :]))
        else:
            assert line in ("", "data: [DONE]") or line.startswith(": "), line[:80]
    return out


def test_line_breaking_characters_are_escaped_in_completion_streams(server):
    body = {"model": MODEL, "prompt": LINE_BREAKERS, "max_tokens": 2, "echo": True, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=server.headers(), timeout=60
    ) as r:
        chunks = data_lines(r)
    assert chunks[0]["choices"][0]["text"].startswith(LINE_BREAKERS)


def test_line_breaking_characters_are_escaped_in_chat_streams(hf_dir):
    class Speaks(FakeEngine):
        async def generate(self, prompt_ids, params, request_id, context_ids=()):
            yield RequestOutput(request_id, 0, (5,), LINE_BREAKERS, True, FinishReason.LENGTH, None, 3, 1, 0)

    client, _ = app_with(Speaks(), hf_dir, limit=4)
    with client.stream("POST", "/v1/chat/completions", json=BODY | {"stream": True}) as r:
        chunks = data_lines(r)
    assert "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks) == LINE_BREAKERS
