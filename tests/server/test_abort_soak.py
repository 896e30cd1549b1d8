"""1,000 streams abandoned by their clients leave nothing behind (RELIABILITY.md item 12).

Each client opens a stream, reads its first token and hangs up; four clients at a time. After
the 200th and the 1,000th abort, with the server idle again: KV cache usage, running and waiting
sequences and asyncio tasks are exactly at the baseline taken before the first, every abandoned
choice is counted as an abort, and from abort 200 to abort 1,000 the thread count grew by at most
the two workers a pool may add, and the resident memory by less than 50 MB. (CPython keeps memory
it freed: the first few hundred requests warm its pools.)
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.server.conftest import MODEL, scrape, start_server, stop_server

ABORTS, CHECKPOINT, CLIENTS = 1000, 200, 4
STREAM_TOKENS = 4000  # what each stream asks for: had it run on, it would outlast every check below
DEADLINE_S = 300  # the whole loop; it takes about a minute on 2 cores
ABORT_REASON = 'request_success_total{finished_reason="abort"}'


def abandon_streams(server, first: int, count: int, deadline: float) -> None:
    """Clients each open `count / CLIENTS` streams in turn, read the first token and hang up."""

    def client(k: int) -> None:
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as http:
            for i in range(first + k, first + count, CLIENTS):
                assert time.monotonic() < deadline, f"abort {i} not reached within {DEADLINE_S} s"
                messages = [{"role": "user", "content": f"Story number {i}"}]
                body = {"model": MODEL, "messages": messages, "max_tokens": STREAM_TOKENS,
                        "ignore_eos": True, "temperature": 0, "stream": True}  # fmt: skip
                with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    for line in r.iter_lines():
                        if '"content":"' in line and '"role":"assistant"' not in line:
                            break  # the first token: leave (closing the response drops the connection)

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def at_rest(server, tasks: float | None = None) -> dict[str, float]:
    """Metrics once the server is idle: abandoned sequences leave the batch within a step, so
    within 5 s of the last client hanging up nothing may run (a 4,000-token stream takes longer),
    and the event loop is back to `tasks` tasks (a stream's own tasks end just after it)."""
    deadline = time.monotonic() + 5
    while True:
        now = scrape(server)
        busy = now["num_requests_running"] + now["num_requests_waiting"]
        if not busy and (tasks is None or now["server_tasks"] == tasks):
            return now
        assert time.monotonic() < deadline, f"not at rest: {busy} sequences, {now['server_tasks']} tasks"
        time.sleep(0.05)


def test_a_thousand_abandoned_streams_leave_nothing_behind(long_dir, tmp_path):
    server = start_server(long_dir, tmp_path / "server.log", "--max-model-len", "4096")
    try:
        deadline = time.monotonic() + DEADLINE_S
        abandon_streams(server, 0, CLIENTS, deadline)  # warm-up: the first requests' one-off allocations
        base = at_rest(server)
        abandon_streams(server, CLIENTS, CHECKPOINT, deadline)
        mid = at_rest(server, base["server_tasks"])
        mid_threads = threads(server.process.pid)
        abandon_streams(server, CLIENTS + CHECKPOINT, ABORTS - CHECKPOINT, deadline)
        end = at_rest(server, base["server_tasks"])
        assert end[ABORT_REASON] - base[ABORT_REASON] == ABORTS  # none ran to its end
        for now in (mid, end):
            assert now["kv_cache_usage_perc"] == base["kv_cache_usage_perc"] == 0
        # Thread pools (prompt encoding) may start a worker or two more at a new peak of
        # concurrency, or retire idle ones; a leak would add one per request.
        assert threads(server.process.pid) <= mid_threads + 2
        grown = end["process_resident_memory_bytes"] - mid["process_resident_memory_bytes"]
        assert grown < 50e6, f"resident memory grew {grown / 1e6:.0f} MB from abort {CHECKPOINT} to {ABORTS}"
        assert scrape(server)["num_requests_running"] == 0
    finally:
        stop_server(server)
