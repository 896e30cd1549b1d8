"""A request that breaks the model fails alone, over HTTP (RELIABILITY.md items 13 and 14).

The server is the real one with faults injected into its model runner by seed (see
`faulty_server`): a fault breaks a whole batched forward, and the neighbours of the request that
causes it must still get exactly the tokens they get alone.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL, scrape, start_server, stop_server
from tests.server.faulty_server import (
    BREAKS_AT_ONCE,
    BREAKS_MID_WAY,
    BREAKS_SECOND_CHOICE,
    NEVER_FITS,
    SECRET,
)

CHAT = "/v1/chat/completions"
PROMPTS = ["Name three colours.", "Count to ten.", "What is a tree?"]


@pytest.fixture(scope="module")
def faulty(hf_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("faulty-server") / "server.log"
    running = start_server(hf_dir, log, module="tests.server.faulty_server")
    yield running
    stop_server(running)


def chat(content: str, seed: int | None = None, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 24,
            "temperature": 0, "ignore_eos": True} | extra  # fmt: skip
    return body | ({"random_seed": seed} if seed is not None else {})


def post(server, body: dict, path: str = CHAT) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=server.headers(), timeout=60)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert "injected" not in response.text and "/srv" not in response.text  # the cause stays in the log
    return error


def test_requests_that_break_the_forward_fail_alone_and_their_batch_goes_on(faulty):
    """One request breaks the forward mid-way (500), one runs out of memory even alone (503);
    the three batched with them get exactly the tokens they get alone."""
    alone = [post(faulty, chat(p, max_tokens=48)).json()["choices"][0]["message"]["content"] for p in PROMPTS]
    bodies = [chat(p, max_tokens=48) for p in PROMPTS]
    bodies += [chat("Tell me a story.", BREAKS_MID_WAY), chat("Hello", NEVER_FITS)]
    with ThreadPoolExecutor(len(bodies)) as pool:  # together, so they share the batched forwards
        *good, bad, oom = pool.map(lambda body: post(faulty, body), bodies)
    assert_error(bad, 500, "internal_error")
    assert_error(oom, 503, "out_of_memory")
    assert [r.json()["choices"][0]["message"]["content"] for r in good] == alone
    assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in good)
    log = faulty.log.read_text()
    assert "retrying each alone" in log and SECRET in log  # it was batched; the cause is logged
    body = {"model": MODEL, "prompt": ["Once", "Twice"], "max_tokens": 8, "seed": BREAKS_MID_WAY}
    assert_error(post(faulty, body, "/v1/completions"), 500, "internal_error")


def test_stream_that_breaks_mid_way_ends_its_choice_with_error(faulty):
    body = chat("Tell me a story.", BREAKS_MID_WAY, stream=True)
    with httpx.stream("POST", faulty.url + CHAT, json=body, headers=faulty.headers(), timeout=60) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert reasons[-1] == "error" and reasons.count("error") == 1
    assert all(reason is None for reason in reasons[:-1])
    assert sum(bool(c["choices"][0]["delta"].get("content")) for c in chunks if c["choices"]) >= 1
    assert SECRET not in "".join(lines)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_failure_before_anything_was_sent_is_a_plain_http_error(faulty, stream):
    assert_error(post(faulty, chat("Hello", BREAKS_AT_ONCE, stream=stream)), 500, "internal_error")
    oom = post(faulty, chat("Hello", NEVER_FITS, stream=stream))
    error = assert_error(oom, 503, "out_of_memory")
    assert int(oom.headers["retry-after"]) > 0 and "memory" in error["message"]
    body = {"model": MODEL, "prompt": ["Once", "Twice"], "max_tokens": 8, "seed": BREAKS_AT_ONCE}
    body["stream"] = stream
    assert_error(post(faulty, body, "/v1/completions"), 500, "internal_error")


def finished_choices(server, reason: str) -> float:
    return scrape(server)[f'request_success_total{{finished_reason="{reason}"}}']


def test_one_failed_choice_fails_the_request_and_counts_its_siblings_as_errors(faulty):
    before = {reason: finished_choices(faulty, reason) for reason in ("error", "abort")}
    body = chat("Tell me a story.", BREAKS_SECOND_CHOICE, n=3, temperature=1.0)
    assert_error(post(faulty, body), 500, "internal_error")
    # Choice 1 failed; the server then ended choices 0 and 2: not a client leaving.
    assert finished_choices(faulty, "error") == before["error"] + 3
    assert finished_choices(faulty, "abort") == before["abort"]


def test_failures_reach_the_openai_client_and_the_server_keeps_serving(faulty):
    failed_before = finished_choices(faulty, "error")
    client = openai.OpenAI(base_url=f"{faulty.url}/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": "Hello"}]
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model=MODEL, messages=messages, seed=BREAKS_MID_WAY, max_tokens=8)
    assert failed.value.status_code == 500 and failed.value.code == "internal_error"
    with pytest.raises(openai.InternalServerError) as oom:
        client.chat.completions.create(model=MODEL, messages=messages, seed=NEVER_FITS, max_tokens=8)
    assert oom.value.status_code == 503 and oom.value.code == "out_of_memory"
    assert httpx.get(faulty.url + "/health").status_code == 200
    assert httpx.get(faulty.url + "/ready").status_code == 200
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert reply.choices[0].finish_reason == "length"
    assert finished_choices(faulty, "error") == failed_before + 2
