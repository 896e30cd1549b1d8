"""Client disconnects free the sequence (streaming and not); SIGTERM drains, then exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.conftest import MODEL, start_server, stop_server

LONG = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 400, "temperature": 0,
        "ignore_eos": True}  # fmt: skip


@pytest.fixture()
def small_server(hf_dir, tmp_path):
    # Two sequences at most: if aborted requests kept their slots, nothing else could run.
    running = start_server(hf_dir, tmp_path / "server.log", "--max-num-seqs", "2")
    yield running
    stop_server(running)


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=server.headers(), timeout=10).text
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


def test_disconnects_abort_generation(small_server):
    s = small_server
    for _ in range(2):  # streaming clients that leave after the first content chunk
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=LONG | {"stream": True},
                          headers=s.headers(), timeout=60) as r:  # fmt: skip
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content":"' in line and '"role"' not in line:
                    break
    for _ in range(2):  # non-streaming clients that time out
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{s.url}/v1/chat/completions", json=LONG, headers=s.headers(), timeout=0.5)
    deadline = time.monotonic() + 10
    while metric(s, "mixtral:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(s, "mixtral:num_requests_running") == 0
    assert metric(s, "mixtral:kv_cache_usage_perc") == 0
    start = time.monotonic()
    for _ in range(2):
        r = httpx.post(
            f"{s.url}/v1/chat/completions", json=LONG | {"max_tokens": 8}, headers=s.headers(), timeout=60
        )
        assert r.status_code == 200
    assert time.monotonic() - start < 20


def test_sigterm_drains_in_flight_then_exits_zero(hf_dir, tmp_path):
    s = start_server(hf_dir, tmp_path / "server.log")
    chunks: list[str] = []

    def stream() -> None:
        body = LONG | {"stream": True, "max_tokens": 60}
        with httpx.stream(
            "POST", f"{s.url}/v1/chat/completions", json=body, headers=s.headers(), timeout=60
        ) as r:
            chunks.extend(line for line in r.iter_lines() if line.startswith("data: "))

    t = threading.Thread(target=stream)
    t.start()
    while not chunks:
        time.sleep(0.01)
    s.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while httpx.get(f"{s.url}/ready", timeout=5).status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = httpx.post(
        f"{s.url}/v1/chat/completions", json=LONG | {"max_tokens": 2}, headers=s.headers(), timeout=10
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    t.join(60)
    assert chunks[-1] == "data: [DONE]"
    finals = [json.loads(c[6:]) for c in chunks[:-1] if '"finish_reason":"' in c]
    assert finals and finals[-1]["choices"][0]["finish_reason"] == "length"
    assert s.process.wait(30) == 0
