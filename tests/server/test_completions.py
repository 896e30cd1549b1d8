"""POST /v1/completions against the real server: text and token-id prompts, n, echo, logprobs, stream."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import MODEL

# Short prompts (under one 16-token KV block), so no request finds them in the prefix cache.
PROMPT = "The weather today"


def post(server, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}", json={"model": MODEL} | body, headers=server.headers(), timeout=60
    )


def complete(server, **body) -> dict:
    r = post(server, {"max_tokens": 6, "temperature": 0} | body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(server, **body) -> list[str]:
    """The `data:` payloads of a streamed completion, `[DONE]` included."""
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0, "stream": True} | body
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=server.headers(), timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def token_ids(server, text: str, special: bool = True) -> list[int]:
    r = post(server, {"prompt": text, "add_special_tokens": special}, "/tokenize")
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_text_prompt_is_deterministic_at_temperature_zero(server):
    a, b = complete(server, prompt=PROMPT), complete(server, prompt=PROMPT)
    assert a["object"] == "text_completion" and a["model"] == MODEL and a["id"].startswith("cmpl-")
    assert a["choices"][0]["text"] == b["choices"][0]["text"] and a["choices"][0]["text"]
    usage = a["usage"]
    assert usage["prompt_tokens"] == len(token_ids(server, PROMPT))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] == 6 or a["choices"][0]["finish_reason"] == "stop"


def test_prompt_list_times_n_is_indexed_prompt_major(server):
    r = complete(server, prompt=["one", "two more"], n=2)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    one, two = (complete(server, prompt=p)["choices"][0]["text"] for p in ("one", "two more"))
    assert [c["text"] for c in r["choices"]] == [one, one, two, two]
    assert r["usage"]["prompt_tokens"] == len(token_ids(server, "one")) + len(token_ids(server, "two more"))
    sampled = complete(server, prompt=["one", "two more"], n=2, temperature=1.0, seed=3)
    assert [c["index"] for c in sampled["choices"]] == [0, 1, 2, 3]


def test_token_id_prompt_equals_the_text_prompt(server):
    ids = token_ids(server, PROMPT)
    by_text, by_ids = complete(server, prompt=PROMPT), complete(server, prompt=ids)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"] == by_text["usage"]
    both = complete(server, prompt=[ids, token_ids(server, "one")])
    assert both["choices"][0]["text"] == by_text["choices"][0]["text"]
    echoed = complete(server, prompt=ids, echo=True)  # ids are echoed as their text
    assert echoed["choices"][0]["text"] == PROMPT + by_text["choices"][0]["text"]


def test_generated_text_keeps_the_leading_space_of_its_first_word(server):
    (is_id,) = token_ids(server, "is", special=False)  # "▁is"
    r = complete(server, prompt=PROMPT, max_tokens=2, logit_bias={str(is_id): 100})
    assert r["choices"][0]["text"] == " is is"
    e = complete(server, prompt=PROMPT, max_tokens=2, logit_bias={str(is_id): 100}, echo=True)
    assert e["choices"][0]["text"] == PROMPT + " is is"


def test_echo_prepends_the_prompt(server):
    plain = complete(server, prompt=PROMPT)["choices"][0]["text"]
    echoed = complete(server, prompt=PROMPT, echo=True)
    assert echoed["choices"][0]["text"] == PROMPT + plain
    assert (
        echoed["usage"]["completion_tokens"] == complete(server, prompt=PROMPT)["usage"]["completion_tokens"]
    )


def test_logprobs_of_the_generated_tokens(server):
    r = complete(server, prompt=PROMPT, logprobs=2)
    choice, n = r["choices"][0], r["usage"]["completion_tokens"]
    lp = choice["logprobs"]
    assert (
        len(lp["tokens"])
        == len(lp["token_logprobs"])
        == len(lp["top_logprobs"])
        == len(lp["text_offset"])
        == n
    )
    assert all(x <= 0 for x in lp["token_logprobs"])
    assert all(len(top) <= 2 and all(v <= 0 for v in top.values()) for top in lp["top_logprobs"])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert all(o <= len(choice["text"]) for o in lp["text_offset"])
    assert complete(server, prompt=PROMPT)["choices"][0]["logprobs"] is None


def test_logprobs_with_echo_cover_the_prompt_first_null(server):
    ids = token_ids(server, PROMPT)
    (is_id,) = token_ids(server, "is", special=False)
    r = complete(server, prompt=PROMPT, max_tokens=2, logprobs=1, echo=True, logit_bias={str(is_id): 100})
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + r["usage"]["completion_tokens"] == len(ids) + 2
    assert lp["tokens"] == ["<s>", " The", " weather", " today", " is", " is"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])
    # character offsets into the choice's text "The weather today is is"
    assert lp["text_offset"] == [0, 0, 3, 11, 17, 20]


def test_stream_concatenates_to_the_full_text(server):
    full = complete(server, prompt=PROMPT, max_tokens=10)
    chunks = stream(server, prompt=PROMPT, max_tokens=10)
    assert chunks[-1] == "[DONE]"
    bodies = [json.loads(c) for c in chunks[:-1]]
    assert all(b["object"] == "text_completion" and b["id"] == bodies[0]["id"] for b in bodies)
    assert "".join(b["choices"][0]["text"] for b in bodies) == full["choices"][0]["text"]
    assert bodies[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert all(b["choices"][0]["finish_reason"] is None for b in bodies[:-1])
    assert bodies[-1]["usage"] == full["usage"]  # Mistral style: on the last chunk by default
    assert all(b["usage"] is None for b in bodies[:-1])


def test_stream_usage_chunk_echo_and_logprobs(server):
    full = complete(server, prompt=PROMPT, echo=True, logprobs=1)
    chunks = stream(server, prompt=PROMPT, echo=True, logprobs=1, stream_options={"include_usage": True})
    bodies = [json.loads(c) for c in chunks[:-1]]
    assert bodies[-1]["choices"] == [] and bodies[-1]["usage"] == full["usage"]
    assert all(b["usage"] is None for b in bodies[:-1])
    choices = [b["choices"][0] for b in bodies[:-1]]
    assert "".join(c["text"] for c in choices) == full["choices"][0]["text"]
    merged = {k: sum((c["logprobs"][k] for c in choices), []) for k in full["choices"][0]["logprobs"]}
    expected = full["choices"][0]["logprobs"]
    assert merged["tokens"] == expected["tokens"] and merged["text_offset"] == expected["text_offset"]
    assert merged["token_logprobs"][0] is None
    assert merged["token_logprobs"][1:] == pytest.approx(expected["token_logprobs"][1:], abs=1e-4)


def test_stream_of_several_prompts_and_choices(server):
    prompts = ["one", "two more"]
    full = complete(server, prompt=prompts, n=2)
    chunks = stream(server, prompt=prompts, n=2)
    assert chunks[-1] == "[DONE]"
    texts, reasons = {}, {}
    for body in map(json.loads, chunks[:-1]):
        (choice,) = body["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"] is not None:
            reasons[choice["index"]] = choice["finish_reason"]
    assert texts == {c["index"]: c["text"] for c in full["choices"]}
    assert reasons == {c["index"]: c["finish_reason"] for c in full["choices"]}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
        ({"prompt": "x", "best_of": 3}, 400, "best_of"),
        ({"prompt": [1, 32000]}, 400, "prompt"),
        ({"prompt": [[1, 2], [-1]]}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": [[1], []]}, 400, "prompt"),
        ({"prompt": ["x"] * 17}, 400, "prompt"),
        ({"prompt": ["x"] * 5, "n": 16}, 400, "n"),
        ({"prompt": "x", "max_tokens": 600}, 400, "prompt"),
        ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
        ({"prompt": "x", "model": "nope"}, 404, "model"),
        ({"prompt": "x", "stream": True, "model": "nope"}, 404, "model"),
        ({"prompt": "x", "stream": True, "max_tokens": 600}, 400, "prompt"),
    ],
)
def test_refusals(server, body, status, param):
    r = post(server, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_context_overflow_names_both_numbers(server):
    r = post(server, {"prompt": "x", "max_tokens": 600})
    error = r.json()["error"]
    assert (
        error["code"] == "context_length_exceeded" and "512" in error["message"] and "602" in error["message"]
    )


def test_an_alias_works_and_the_answer_names_it(server):
    r = post(server, {"model": "open-mixtral-8x7b", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == "open-mixtral-8x7b"
