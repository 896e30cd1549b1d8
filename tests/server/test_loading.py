"""A real server held at its gates (tests/server/gated_server.py): requests while the model loads,
the one line that says it serves, and a burst against the admission bound (RELIABILITY.md 1, 17)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from server.settings import READY_LINE
from tests.server.conftest import ALIASES, API_KEY, MODEL, launch, start_server, stop_server

GATED = "tests.server.gated_server"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
ADMITTED = 8  # --max-num-seqs 4 + max_waiting_requests 4, in the burst test
NO_MAX_TOKENS = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def ready_lines(log) -> list[str]:
    return [line for line in log.read_text().splitlines() if READY_LINE in line]


@pytest.fixture
def loading(hf_dir, tmp_path):
    """A server still loading its model, with no --max-model-len: the context length comes from
    the KV pool, which is not sized yet."""
    gate = tmp_path / "load"
    args = ["--model", str(hf_dir), "--served-model-name", MODEL, *ALIASES, "--kv-cache-memory-gb", "0.05"]
    args += ["--api-key", API_KEY]
    server = launch(
        args, tmp_path / "server.log", module=GATED, env={"GATE_LOAD": str(gate)}, until="/health"
    )
    yield server, gate
    stop_server(server)


def test_requests_while_loading_get_503_not_ready(loading):
    server, gate = loading
    assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 503
    for path, body in [
        (CHAT, NO_MAX_TOKENS),  # its default max_tokens needs the context length, not known yet
        (CHAT, NO_MAX_TOKENS | {"max_tokens": 2}),
        (CHAT, NO_MAX_TOKENS | {"stream": True}),
        (COMPLETIONS, {"model": MODEL, "prompt": "The sky"}),
        (COMPLETIONS, {"model": "nope", "prompt": "The sky"}),
        ("/tokenize", {"prompt": "The sky"}),
    ]:
        r = httpx.post(f"{server.url}{path}", json=body, headers=HEADERS, timeout=10)
        assert r.status_code == 503, (path, body, r.text)
        assert r.json()["error"]["code"] == "not_ready" and int(r.headers["retry-after"]) >= 1
    r = httpx.get(f"{server.url}/v1/models", headers=HEADERS, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    assert ready_lines(server.log) == []
    gate.touch()
    deadline = time.monotonic() + 60
    while not ready_lines(server.log) and time.monotonic() < deadline:
        time.sleep(0.05)
    r = httpx.post(f"{server.url}{CHAT}", json=NO_MAX_TOKENS | {"max_tokens": 2}, headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text


def test_one_ready_line_once_ready_names_the_url_and_model_ids(loading):
    server, gate = loading
    time.sleep(0.5)
    assert ready_lines(server.log) == [] and httpx.get(f"{server.url}/ready", timeout=10).status_code == 503
    gate.touch()
    deadline = time.monotonic() + 60
    while not ready_lines(server.log) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200  # true when it is printed
    (line,) = ready_lines(server.log)
    assert f"{READY_LINE} {server.url} " in line
    assert "model ids: " + ", ".join([MODEL, *ALIASES]) in line
    log = server.log.read_text()
    assert log.index("Uvicorn running on") < log.index(READY_LINE)  # the line that misled: it comes first


def test_a_burst_is_admitted_up_to_the_bound_exactly(hf_dir, tmp_path):
    """max_num_seqs 4 + max_waiting_requests 4: of 60 simultaneous requests, 8 are admitted and
    52 refused at once. The engine takes no step meanwhile, so nothing admitted can finish early."""
    steps = tmp_path / "steps-held"
    env = {"GATE_STEPS": str(steps), "MIXTRAL_MAX_WAITING_REQUESTS": "4"}
    server = start_server(hf_dir, tmp_path / "server.log", "--max-num-seqs", "4", module=GATED, env=env)
    try:
        steps.touch()
        refused, admitted = asyncio.run(burst(server, steps, 60))
    finally:
        steps.unlink(missing_ok=True)
        stop_server(server)
    assert len(refused) == 60 - ADMITTED, [r.status_code for r in refused]
    for r in refused:
        assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded", r.text
        assert int(r.headers["retry-after"]) >= 1
    assert len(admitted) == ADMITTED and all(r.status_code == 200 for r in admitted), [
        r.text for r in admitted
    ]


async def burst(server, steps, count: int) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """Send `count` requests at once; (those answered while steps are held, the rest).

    Nothing admitted can finish while steps are held, so answers stop at `count - ADMITTED`
    (or sooner, if too many were admitted: then the deadline ends the wait).
    """
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, limits=limits, timeout=60) as client:
        body = NO_MAX_TOKENS | {"max_tokens": 2}
        tasks = [asyncio.create_task(client.post(CHAT, json=body)) for _ in range(count)]
        deadline = time.monotonic() + 30
        while sum(t.done() for t in tasks) < count - ADMITTED and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # one more refusal than expected would show here
        refused = [t.result() for t in tasks if t.done()]
        steps.unlink()
        admitted = list(await asyncio.gather(*(t for t in tasks if not t.done())))
    return refused, admitted
