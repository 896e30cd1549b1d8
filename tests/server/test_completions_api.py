"""POST /v1/completions against the real server: prompts as text and ids, n, echo, logprobs, stream."""

from __future__ import annotations

import json

import httpx

from tests.server.conftest import MODEL


def post(server, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}", json={"model": MODEL} | body, headers=server.headers(), timeout=60
    )


def test_text_prompt_is_deterministic_at_temperature_zero(server):
    body = {"prompt": "The weather today", "max_tokens": 12, "temperature": 0}
    a, b = post(server, body).json(), post(server, body).json()
    assert a["object"] == "text_completion" and a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"]["completion_tokens"] == 12 or a["choices"][0]["finish_reason"] == "stop"


def test_prompt_list_and_n_index_prompt_major(server):
    r = post(
        server, {"prompt": ["one", "two"], "n": 2, "max_tokens": 3, "temperature": 1.0, "seed": 3}
    ).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]


def test_token_id_prompt_equals_text_prompt(server):
    ids = post(server, {"prompt": "Once upon a time"}, "/tokenize").json()["tokens"]
    by_text = post(server, {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}).json()
    by_ids = post(server, {"prompt": ids, "max_tokens": 8, "temperature": 0}).json()
    assert by_text["choices"][0]["text"] == by_ids["choices"][0]["text"]
    assert by_text["usage"]["prompt_tokens"] == len(ids)


def test_echo_and_logprobs(server):
    r = post(server, {"prompt": "Hello there", "max_tokens": 4, "temperature": 0, "logprobs": 2}).json()
    lp = r["choices"][0]["logprobs"]
    n = r["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert all(len(t) <= 2 for t in lp["top_logprobs"]) and all(x <= 0 for x in lp["token_logprobs"])
    e = post(
        server, {"prompt": "Hello there", "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True}
    ).json()
    choice = e["choices"][0]
    assert choice["text"].startswith("Hello there")
    assert choice["text"] == "Hello there" + r["choices"][0]["text"]
    prompt_len = e["usage"]["prompt_tokens"]
    assert len(choice["logprobs"]["tokens"]) == prompt_len + e["usage"]["completion_tokens"]
    assert (
        choice["logprobs"]["token_logprobs"][0] is None
        and choice["logprobs"]["token_logprobs"][1] is not None
    )


def test_stream_concatenates_to_the_full_text(server):
    body = {"prompt": "A list of colours:", "max_tokens": 10, "temperature": 0}
    full = post(server, body).json()["choices"][0]["text"]
    chunks = []
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={"model": MODEL, "stream": True} | body,
        headers=server.headers(), timeout=60,
    ) as r:  # fmt: skip
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    text = "".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1] if json.loads(c)["choices"])
    assert text == full


def test_refusals(server):
    assert post(server, {"prompt": "x", "suffix": "y"}).status_code == 400
    assert post(server, {"prompt": [1, 10**8]}).status_code == 400
    assert post(server, {"prompt": "x", "model": "nope"}).status_code == 404
