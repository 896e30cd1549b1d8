"""RELIABILITY.md item 24: one structured access-log line per request, with its tokens, queue
time, time to first token and finish reasons, and never the prompt or the generated text."""

from __future__ import annotations

import json
import time
import uuid

import httpx

from tests.server.conftest import MODEL
from tests.server.test_keep_alive import access_log_entries

SECRET = "zebra-marmalade-4417"  # in the prompts: must never reach the log


def logged(server, request_id: str) -> dict:
    deadline = time.monotonic() + 10  # the line is written just after the response
    while time.monotonic() < deadline:
        entries = access_log_entries(server.log.read_text(errors="replace"))
        if request_id in entries:
            return entries[request_id]
        time.sleep(0.05)
    raise AssertionError(f"no access-log line for {request_id}")


def post(server, path: str, body: dict, stream: bool = False) -> tuple[str, str]:
    rid = f"log-{uuid.uuid4().hex[:8]}"
    headers = server.headers() | {"X-Request-Id": rid}
    r = httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return rid, r.text


def test_a_chat_request_logs_its_tokens_times_and_finish_reason(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"say {SECRET}"}], "max_tokens": 5}
    rid, text = post(server, "/v1/chat/completions", body | {"temperature": 0})
    usage = json.loads(text)["usage"]
    line = logged(server, rid)
    assert line["status"] == 200 and line["path"] == "/v1/chat/completions"
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert line["finish_reasons"] == [json.loads(text)["choices"][0]["finish_reason"]]
    assert 0 <= line["queue_time_ms"] <= line["ttft_ms"] <= line["duration_ms"]


def test_a_stream_of_two_choices_and_a_completion_log_each_choice(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": SECRET}], "max_tokens": 4, "n": 2}
    rid, _ = post(server, "/v1/chat/completions", body | {"stream": True, "temperature": 1.0, "seed": 3})
    line = logged(server, rid)
    assert line["completion_tokens"] >= 2 and len(line["finish_reasons"]) == 2
    assert all(reason in ("stop", "length") for reason in line["finish_reasons"])
    assert line["ttft_ms"] > 0
    rid, text = post(server, "/v1/completions", {"model": MODEL, "prompt": [SECRET, "b"], "max_tokens": 3})
    line = logged(server, rid)
    assert line["finish_reasons"] == [c["finish_reason"] for c in json.loads(text)["choices"]]
    assert line["prompt_tokens"] == json.loads(text)["usage"]["prompt_tokens"]


def test_the_log_holds_no_prompt_text(server):
    post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": SECRET}]})
    assert SECRET not in server.log.read_text(errors="replace")


def test_an_abandoned_stream_logs_abort(server):
    rid = f"log-{uuid.uuid4().hex[:8]}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400,
            "ignore_eos": True, "stream": True}  # fmt: skip
    headers = server.headers() | {"X-Request-Id": rid}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"role":"assistant"' not in line:
                break  # leave after the first token
    line = logged(server, rid)
    assert line["finish_reasons"] == ["abort"] and 0 < line["completion_tokens"] < 400
