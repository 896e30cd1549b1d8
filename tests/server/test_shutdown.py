"""RELIABILITY.md item 16 with a client that stalls: SIGTERM drains up to the drain timeout, then
ends what is left (a stream with `finish_reason: "error"` and `[DONE]`, not a cut body), closes
the connections that remain, and exits 0, in time for Docker's stop grace period."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx

from tests.server.conftest import API_KEY, MODEL, scrape, start_server

CHAT = "/v1/chat/completions"
DRAIN_S = 3
# A stream whose every chunk is large (20 alternatives per token), long enough to outlast the drain.
LONG = {
    "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3500, "ignore_eos": True,
    "temperature": 0, "stream": True, "logprobs": True, "top_logprobs": 20,
}  # fmt: skip


def stalled_client(url: str, body: dict) -> socket.socket:
    """Sends a streaming request and never reads: its receive buffer is 4 KiB."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    payload = json.dumps(body).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def running(server) -> float:
    return scrape(server).get("num_requests_running", 0.0)


def test_sigterm_with_a_stalled_client_ends_streams_cleanly_and_exits_zero(long_dir, tmp_path):
    server = start_server(long_dir, tmp_path / "server.log", "--max-model-len", "4096",
                          env={"MIXTRAL_DRAIN_TIMEOUT_S": str(DRAIN_S)})  # fmt: skip
    stalled = stalled_client(server.url, LONG)
    lines: list[str] = []
    started = threading.Event()

    def reading() -> None:
        with httpx.stream("POST", server.url + CHAT, json=LONG, headers=server.headers(), timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)
                started.set()

    reader = threading.Thread(target=reading)
    reader.start()
    try:
        assert started.wait(30)
        deadline = time.monotonic() + 30
        while running(server) < 2:
            assert time.monotonic() < deadline, "both streams must be in the engine"
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = server.process.wait(DRAIN_S + 15)
        took = time.monotonic() - sent
        reader.join(10)
    finally:
        stalled.close()
        if server.process.poll() is None:
            server.process.kill()
    assert code == 0, server.log.read_text()[-3000:]
    assert DRAIN_S - 0.5 < took < DRAIN_S + 15, (
        took
    )  # it drained first, then did not wait for the stalled client
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]", data[-2:]  # a whole stream, not a cut body
    last = json.loads(data[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "error"  # its choice ended at the drain deadline


def test_a_second_sigterm_stops_at_once(long_dir, tmp_path):
    server = start_server(long_dir, tmp_path / "server.log", "--max-model-len", "4096",
                          env={"MIXTRAL_DRAIN_TIMEOUT_S": "120"})  # fmt: skip
    stalled = stalled_client(server.url, LONG)
    try:
        deadline = time.monotonic() + 30
        while running(server) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)  # an operator who will not wait the 120 s
        sent = time.monotonic()
        server.process.wait(15)
        assert time.monotonic() - sent < 15
    finally:
        stalled.close()
        if server.process.poll() is None:
            server.process.kill()
