"""Admission control and readiness, about HTTP alone: the app over a fake engine client."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.testclient import TestClient

from engine.outputs import QueueTimeoutError
from server.app import create_app
from server.settings import ServerSettings
from server.state import Admission, AppState, ServedModel
from tokenization import load_prompt_encoder

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@dataclass
class FakeEngine:
    num_active_requests: int = 0
    is_ready: bool = True
    is_healthy: bool = True

    def generate(self, *args, **kwargs):
        raise AssertionError("must not be called when the request is refused")

    def abort(self, request_id: str) -> None:
        pass


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
