"""The HTTP server with the model split over two ranks (gloo on CPU): its replies, and its faults.

A rank that dies or stops answering is fatal: every client gets an error within seconds, the
engine dies (the dead-engine path of tests/server/test_dead_engine.py: /health 503), the server
exits non-zero, and no worker is left.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from engine.sampling_params import SamplingParams
from tests.engine.helpers import make_engine, run, text, tokens
from tests.server.conftest import MODEL, RunningServer, start_server, stop_server
from tests.server.test_http_matches_engine import MESSAGES
from tokenization import load_prompt_encoder, parse_messages

TIMEOUT_S = 3  # collective_timeout_s of the servers here


def workers_of(server: RunningServer) -> list[int]:
    """The pids of the server's worker ranks (its `engine.worker` children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server.process.pid and b"engine.worker" in cmdline:
            pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def tp_server(hf_dir: Path, log: Path, ep: bool = False) -> RunningServer:
    extra = ["--tensor-parallel-size", "2", *(["--expert-parallel"] if ep else [])]
    return start_server(hf_dir, log, *extra, env={"MIXTRAL_COLLECTIVE_TIMEOUT_S": str(TIMEOUT_S)})


@pytest.mark.parametrize("ep", [False, True], ids=["tp2", "ep2"])
def test_greedy_over_http_equals_one_rank_engine(hf_dir, tmp_path, ep):
    server = tp_server(hf_dir, tmp_path / "server.log", ep)
    try:
        assert len(workers_of(server)) == 1
        prompt = load_prompt_encoder(hf_dir).encode_chat(parse_messages(MESSAGES))
        want = run(make_engine(hf_dir), {"x": (prompt, SamplingParams(temperature=0.0, max_tokens=24))})[
            ("x", 0)
        ]
        body = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 24}
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as client:
            for stream in (False, True, False):  # one keep-alive connection, as the SDKs use
                if not stream:
                    r = client.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200, r.text
                    reply = r.json()
                    assert reply["choices"][0]["message"]["content"] == text(want)
                    assert reply["usage"]["completion_tokens"] == len(tokens(want))
                    continue
                with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
                    deltas = [
                        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                        for line in r.iter_lines()
                        if line.startswith("data: {")
                    ]
                assert "".join(deltas) == text(want)
    finally:
        stop_server(server)
    assert server.process.returncode == 0  # SIGTERM: a clean stop, workers and all


def test_a_worker_that_dies_while_idle_stops_the_server(hf_dir, tmp_path):
    server = tp_server(hf_dir, tmp_path / "server.log")
    try:
        (worker,) = workers_of(server)
        os.kill(worker, signal.SIGKILL)
        server.process.wait(10)  # the engine loop checks its ranks while idle, too
        assert server.process.returncode not in (0, None)
    finally:
        stop_server(server)
    assert "worker rank 1" in server.log.read_text() and "SIGKILL" in server.log.read_text()


def _stream_until_cut(server: RunningServer, result: dict) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 400, "ignore_eos": True, "stream": True}
    chunks = []
    try:
        with (
            httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    result.setdefault("first", time.monotonic())
    except httpx.HTTPError as exc:
        result["error"] = repr(exc)
    result["chunks"] = chunks
    result["ended"] = time.monotonic()


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_worker_fault_mid_stream_is_fatal(hf_dir, tmp_path, fault):
    server = tp_server(hf_dir, tmp_path / "server.log")
    (worker,) = workers_of(server)
    result: dict = {}
    client = threading.Thread(target=_stream_until_cut, args=(server, result))
    try:
        client.start()
        deadline = time.monotonic() + 30
        while "first" not in result and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "first" in result, "the stream never started"
        time.sleep(0.2)
        os.kill(worker, getattr(signal, fault))
        struck = time.monotonic()
        client.join(30)
        assert not client.is_alive()
        # Killed: rank 0's next collective fails at once. Stopped: it times out.
        bound = 5 if fault == "SIGKILL" else TIMEOUT_S + 5
        print(f"{fault}: the stream ended {result['ended'] - struck:.2f} s after the signal")
        assert result["ended"] - struck < bound
        finish = [c["choices"][0].get("finish_reason") for c in result["chunks"]]
        assert "length" not in finish and "stop" not in finish  # it did not end as if whole
        assert "error" in result or finish[-1] == "error"
        server.process.wait(30)
        assert server.process.returncode not in (0, None)  # dead engine: exit non-zero
        deadline = time.monotonic() + 10
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(worker), "the worker rank was left behind"
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)
        stop_server(server)
    log = server.log.read_text()
    assert "worker rank 1" in log or "RankFailure" in log, log[-2000:]
