"""RELIABILITY.md item 15: when the engine loop dies, every waiter gets an error within seconds,
/health turns 503, and the process exits non-zero so that Docker or Kubernetes restarts it.

The real server with a fault that kills its engine loop (`faulty_server.KILLS_THE_LOOP`)."""

from __future__ import annotations

import json
import threading
import time

import httpx

from tests.server.conftest import MODEL, scrape, start_server
from tests.server.faulty_server import KILLS_THE_LOOP, SECRET

CHAT = "/v1/chat/completions"
WITHIN_S = 10


def test_a_dead_engine_loop_fails_every_waiter_and_exits_non_zero(long_dir, tmp_path):
    server = start_server(long_dir, tmp_path / "server.log", "--max-model-len", "4096",
                          module="tests.server.faulty_server")  # fmt: skip
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    results: dict[str, object] = {}

    started = threading.Event()

    def streaming() -> None:
        lines = results.setdefault("stream", [])
        with httpx.stream("POST", server.url + CHAT, json=body | {"stream": True}, headers=server.headers(),
                          timeout=60) as r:  # fmt: skip
            results["stream_status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    started.set()
        results["stream_done"] = time.monotonic()

    def waiting() -> None:
        r = httpx.post(server.url + CHAT, json=body, headers=server.headers(), timeout=60)
        results["plain"], results["plain_done"] = r, time.monotonic()

    threads = [threading.Thread(target=streaming), threading.Thread(target=waiting)]
    for t in threads:
        t.start()
    assert started.wait(30), "the stream never started"
    deadline = time.monotonic() + 30
    while scrape(server).get("num_requests_running", 0) < 2:  # both in the engine, not on their way
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed = time.monotonic()
    killer = body | {"random_seed": KILLS_THE_LOOP}
    kill = httpx.post(server.url + CHAT, json=killer, headers=server.headers(), timeout=60)
    for t in threads:
        t.join(WITHIN_S + 5)
    assert kill.status_code == 503 and kill.json()["error"]["code"] == "engine_dead", kill.text
    plain = results["plain"]
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "engine_dead", plain.text
    assert results["plain_done"] - killed < WITHIN_S
    assert results["stream_status"] == 200 and results["stream"][-1] == "data: [DONE]"
    last = json.loads(results["stream"][-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "error"  # ended in-band, not cut
    assert results["stream_done"] - killed < WITHIN_S
    for text in (kill.text, plain.text, *results["stream"]):
        assert SECRET not in text
    try:
        health = httpx.get(server.url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "dead"
    except httpx.TransportError:
        pass  # already gone: the exit below is what matters
    assert server.process.wait(WITHIN_S + 20) == 3  # non-zero: the orchestrator restarts it
    assert "engine loop died" in server.log.read_text()
