"""Admission, readiness and the last-resort 500, about HTTP alone: the app over a fake engine client."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field

import httpx
import uvicorn
from fastapi.testclient import TestClient

from engine.errors import QueueTimeoutError
from engine.outputs import EngineStats, RequestOutput
from engine.request import FinishReason
from server.app import create_app
from server.settings import ServerSettings
from server.state import Admission, AppState, ServedModel
from tests.server.conftest import free_port
from tokenization import load_prompt_encoder

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@dataclass
class FakeEngine:
    num_active_requests: int = 0
    is_ready: bool = True
    is_healthy: bool = True
    dead_error: Exception | None = None

    def generate(self, *args, **kwargs):
        raise AssertionError("must not be called when the request is refused")

    def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0.0, 0, 0)


def app_with(engine: FakeEngine, hf_dir, limit: int) -> tuple[TestClient, AppState]:
    model = ServedModel("m", (), load_prompt_encoder(hf_dir), 512, 0.7, "test model")
    state = AppState(engine=engine, admission=Admission(limit), model=model)
    return TestClient(create_app(state, ServerSettings())), state


def test_overload_is_429_with_retry_after(hf_dir):
    client, state = app_with(FakeEngine(), hf_dir, limit=2)
    with state.admission.slot(), state.admission.slot():  # two requests in flight
        r = client.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
    assert int(r.headers["retry-after"]) >= 1
    assert state.admission.in_flight == 0  # a refused request holds no slot


def test_not_ready_then_draining(hf_dir):
    engine = FakeEngine(is_ready=False)
    client, state = app_with(engine, hf_dir, limit=10)
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 503
    for path, body in (("/v1/chat/completions", BODY), ("/v1/completions", {"model": "m", "prompt": "a"})):
        r = client.post(path, json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready", r.text
        assert "retry-after" in r.headers
    engine.is_ready = True
    assert client.get("/ready").status_code == 200
    state.shutting_down = True
    assert client.get("/ready").status_code == 503
    r = client.post("/v1/chat/completions", json=BODY)
    assert (
        r.status_code == 503 and r.json()["error"]["code"] == "shutting_down" and "retry-after" in r.headers
    )


@dataclass
class QueueTimeoutEngine(FakeEngine):
    async def generate(self, *args, **kwargs):
        raise QueueTimeoutError("the request waited more than 120 s for a slot and was not started")
        yield  # an async generator, like the real engine's


def test_queue_timeout_is_503_with_retry_after_streaming_or_not(hf_dir):
    client, _ = app_with(QueueTimeoutEngine(), hf_dir, limit=10)
    for body in (BODY, BODY | {"stream": True}):
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "queue_timeout" and "waited more than 120 s" in r.text
        assert int(r.headers["retry-after"]) >= 1


@dataclass
class Streams(FakeEngine):
    """Two outputs per request; records how many admission slots were held while it generated."""

    state: AppState | None = None
    held: list[int] = field(default_factory=list)

    async def generate(self, prompt_ids, params, request_id, context_ids=()):
        self.held.append(self.state.admission.in_flight)
        yield RequestOutput(request_id, 0, (5,), "a", False, None, None, len(prompt_ids), 1, 0)
        yield RequestOutput(request_id, 0, (6,), "b", True, FinishReason.LENGTH, None, len(prompt_ids), 2, 0)


def test_the_admission_slot_lives_as_long_as_the_response(hf_dir):
    engine = Streams()
    client, state = app_with(engine, hf_dir, limit=1)
    engine.state = state
    for body in (BODY, BODY | {"stream": True}):
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and "b" in r.text
        assert state.admission.in_flight == 0
    assert engine.held == [1, 1]  # held while generating, streamed or not
    last_assistant = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    r = client.post("/v1/chat/completions", json=BODY | {"messages": last_assistant})  # refused once admitted
    assert r.status_code == 400 and state.admission.in_flight == 0


@dataclass
class Buggy(FakeEngine):
    def generate(self, *args, **kwargs):
        raise ValueError("a bug at /srv/app/engine.py")


@contextlib.contextmanager
def uvicorn_serving(app):
    """`app` on real uvicorn at 127.0.0.1, in a thread of this process."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_bug_is_a_500_that_keeps_the_connection_and_its_request_id(hf_dir, caplog):
    client, _ = app_with(Buggy(), hf_dir, limit=4)
    opened = []
    trace = {
        "trace": lambda event, info: (
            opened.append(event) if event == "connection.connect_tcp.complete" else None
        )
    }
    limits = httpx.Limits(max_connections=1)
    with uvicorn_serving(client.app) as url, httpx.Client(base_url=url, limits=limits, timeout=30) as http:
        for i in range(3):
            r = http.post(
                "/v1/chat/completions", json=BODY, headers={"X-Request-Id": f"bug-{i}"}, extensions=trace
            )
            assert r.status_code == 500 and r.headers["x-request-id"] == f"bug-{i}"
            error = r.json()["error"]
            assert error["code"] == "internal_error" and error["message"] == "Internal server error"
            assert "/srv/app" not in r.text
            assert http.get("/health", extensions=trace).status_code == 200
    assert len(opened) == 1
    logged = [r for r in caplog.records if r.name == "server.middleware" and r.exc_info]
    assert len(logged) == 3 and "bug-0" in logged[0].getMessage()  # the traceback, with the request id


@dataclass
class DiesMidStream(FakeEngine):
    """Choice 0 finishes, then the engine raises before choice 1 does (a dead engine, say)."""

    async def generate(self, prompt_ids, params, request_id, context_ids=()):
        n = len(prompt_ids)
        yield RequestOutput(request_id, 1, (5,), "a", False, None, None, n, 1, 0)
        yield RequestOutput(request_id, 0, (6,), "b", True, FinishReason.LENGTH, None, n, 1, 0)
        raise RuntimeError("the engine stopped")


def test_an_exception_mid_stream_ends_each_unfinished_choice_once(hf_dir):
    client, state = app_with(DiesMidStream(), hf_dir, limit=4)
    with client.stream("POST", "/v1/chat/completions", json=BODY | {"stream": True, "n": 2}) as r:
        assert r.status_code == 200
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    finals = [
        (c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in map(json.loads, lines[:-1])
    ]
    finals = [f for f in finals if f[1] is not None]
    assert finals == [(0, "length"), (1, "error")]  # a finished choice is not ended again
    assert state.admission.in_flight == 0
