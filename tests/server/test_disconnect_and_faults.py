"""Client disconnects abort generation (RELIABILITY.md item 12); SIGTERM drains (item 16).

The disconnect tests do not read /metrics (only the SIGTERM test does, to know that both its
requests are in the engine). Instead a dedicated server has two sequence slots and a KV pool of
207 blocks of 16 tokens (3,312 tokens; context 3,312), and the requests are sized so that what
aborted requests leave behind is visible from outside:

- each aborted "hog" has an ~850-token prompt (54 blocks) and wants 2,400 more tokens;
- each "probe" afterwards has a ~1,630-token prompt and 8 new tokens (102-103 blocks).

Two probes fit the pool together (206 blocks). Had the two aborted hogs kept their blocks
(108), 99 would be left and no probe could ever be admitted; had they kept running, they would
hold both slots for ~2,400 more decode steps. So two probes that finish promptly show that the
aborted requests left the batch and gave their blocks back.
"""

from __future__ import annotations

import json
import re
import signal
import statistics
import threading
import time

import httpx
import pytest

from tests.server.conftest import MODEL, scrape, start_server, stop_server

CHAT = "/v1/chat/completions"
KV_CACHE_GB = "0.00158"  # the tiny model's KV cache takes 512 B/token: 207 blocks of 16 tokens
POOL_TOKENS = 207 * 16
HOG_WORDS, HOG_TOKENS = 840, 2400
PROBE_WORDS, PROBE_TOKENS = 1620, 8


def request(tag: str, words: int, max_tokens: int, **extra) -> dict:
    # A distinct first word per request: no two requests share a cached prefix block.
    content = tag + " the" * words
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True} | extra  # fmt: skip


def hog(tag: str, **extra) -> dict:
    return request(tag, HOG_WORDS, HOG_TOKENS, **extra)


@pytest.fixture(scope="module")
def small_server(long_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("small-server") / "server.log"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MIXTRAL_MAX_WAITING_REQUESTS", "2")  # admission: 2 running + 2 waiting
        # The torch step: a Holder keeps its slot for HOG_TOKENS decode steps, which must outlast
        # the queued clients' 3 s wait; the native CPU step would finish them in about 2.4 s.
        running = start_server(long_dir, log, "--max-num-seqs", "2", "--kv-cache-memory-gb", KV_CACHE_GB,
                               "--max-model-len", "4096", "--kernels", "torch")  # fmt: skip
    # The sizing above assumes this pool; the startup line says how many tokens it holds.
    pool = re.search(r"KV cache [\d.]+ GiB \((\d+) tokens\)", running.log.read_text())
    assert pool and int(pool.group(1)) == POOL_TOKENS, f"unexpected KV pool: {pool and pool.group(0)}"
    yield running
    stop_server(running)


def run_in_threads(*targets, timeout: float = 120) -> list:
    results: list = [None] * len(targets)

    def run(i, target):
        try:
            results[i] = target()
        except Exception as exc:  # reported by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results


def stream_then_leave(s, body: dict, chunks: int) -> list[float]:
    """Read `chunks` content chunks of a stream, then drop the connection; their arrival times."""
    times: list[float] = []
    with httpx.stream("POST", f"{s.url}{CHAT}", json=body, headers=s.headers(), timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                assert choice["finish_reason"] is None, "the hog finished: it was meant to be aborted"
                if choice["delta"].get("content"):
                    times.append(time.monotonic())
                    if len(times) == chunks:
                        break
    return times


def post_then_time_out(s, body: dict, timeout: float = 0.75) -> str:
    try:
        httpx.post(f"{s.url}{CHAT}", json=body, headers=s.headers(), timeout=timeout)
    except httpx.ReadTimeout:
        return "timed out"
    return "finished"


def probes_finish(s, phase: str, deadline_s: float) -> None:
    """Two big requests at once: both must be admitted and finish within `deadline_s`."""

    def probe(i: int):
        body = request(f"probe{phase.replace(' ', '')}{i}", PROBE_WORDS, PROBE_TOKENS)
        return httpx.post(f"{s.url}{CHAT}", json=body, headers=s.headers(), timeout=deadline_s + 10)

    start = time.monotonic()
    results = run_in_threads(lambda: probe(0), lambda: probe(1), timeout=deadline_s + 20)
    elapsed = time.monotonic() - start
    for r in results:
        assert isinstance(r, httpx.Response) and r.status_code == 200, r
        usage = r.json()["usage"]
        assert PROBE_WORDS < usage["prompt_tokens"] < PROBE_WORDS + 20
        assert usage["completion_tokens"] == PROBE_TOKENS
    assert elapsed < deadline_s, f"{phase}: probes took {elapsed:.1f} s (deadline {deadline_s:.1f} s)"


def test_disconnected_clients_free_their_slot_and_blocks(small_server):
    s = small_server
    # Streaming clients that leave after some content chunks; their timing gives the step time.
    times = run_in_threads(
        *[lambda i=i: stream_then_leave(s, hog(f"hogS{i}", stream=True), 25) for i in range(2)]
    )
    assert all(isinstance(t, list) and len(t) == 25 for t in times), times
    step_s = statistics.median(b - a for t in times for a, b in zip(t[5:], t[6:], strict=False))
    # Had the hogs kept running, the probes would wait ~HOG_TOKENS - 25 steps for a slot.
    deadline_s = max(5.0, 0.4 * step_s * (HOG_TOKENS - 25))
    probes_finish(s, "after streams", deadline_s)

    # Non-streaming clients whose read times out (after prefill, while decoding).
    outcomes = run_in_threads(*[lambda i=i: post_then_time_out(s, hog(f"hogN{i}")) for i in range(2)])
    assert outcomes == ["timed out", "timed out"], outcomes
    probes_finish(s, "after timeouts", deadline_s)


class Holder:
    """A streaming request that keeps its slot until `release()`."""

    def __init__(self, s, tag: str) -> None:
        self.started, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(s, hog(tag, stream=True)))
        self.thread.start()

    def _run(self, s, body: dict) -> None:
        with httpx.stream("POST", f"{s.url}{CHAT}", json=body, headers=s.headers(), timeout=60) as r:
            for line in r.iter_lines():
                if '"content":"' in line and '"role":"assistant"' not in line:
                    self.started.set()
                if self.stop.is_set():
                    return

    def release(self) -> None:
        self.stop.set()
        self.thread.join(60)


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_clients_that_leave_while_queued_free_their_places(small_server, stream):
    s = small_server
    holders = [Holder(s, f"hold{stream}{i}") for i in range(2)]  # both slots busy for ~2,400 steps
    try:
        assert all(h.started.wait(30) for h in holders)

        def admitted_now() -> bool:
            """Whether a new request gets in (a 429 says the admission bound is reached)."""
            try:
                r = httpx.post(
                    f"{s.url}{CHAT}", json=request("check", 5, 4), headers=s.headers(), timeout=0.5
                )
            except httpx.ReadTimeout:
                return True  # accepted and waiting; leaving aborts it (tested above)
            assert r.status_code == 429, r.text
            return False

        # Two queued requests whose clients give up while they wait.
        outcomes: list = []
        queued = threading.Thread(
            target=lambda: outcomes.extend(
                run_in_threads(
                    *[lambda i=i: post_then_time_out(s, request(f"queued{i}", 5, 4, stream=stream), 3)
                      for i in range(2)]
                )
            )
        )  # fmt: skip
        queued.start()
        time.sleep(1)  # both registered: 2 running + 2 waiting is the admission bound
        assert not admitted_now(), "the queued requests did not fill the admission bound"
        queued.join(30)
        assert outcomes == ["timed out", "timed out"], outcomes  # they waited, were not refused
        deadline = time.monotonic() + 3
        while not admitted_now():  # the clients have left: their places must come free
            assert time.monotonic() < deadline, "requests abandoned in the queue still hold their places"
            time.sleep(0.1)
    finally:
        for h in holders:
            h.release()


def sequences_in_engine(server) -> float:
    now = scrape(server)
    return now["num_requests_running"] + now["num_requests_waiting"]


def test_sigterm_drains_in_flight_requests_then_exits_zero(long_dir, tmp_path):
    s = start_server(long_dir, tmp_path / "server.log", "--max-model-len", "4096")
    try:
        # In-flight requests that last ~3 s on this machine, however fast it is.
        times = stream_then_leave(s, request("warm", 5, 40, stream=True), 21)
        step_s = (times[-1] - times[0]) / 20
        max_tokens = int(min(3000, max(40, 3.0 / max(step_s, 1e-4))))
        body = request("drain", 5, max_tokens)
        lines: list[str] = []
        first_content = threading.Event()

        def streaming() -> None:
            with httpx.stream(
                "POST", f"{s.url}{CHAT}", json=body | {"stream": True}, headers=s.headers(), timeout=120
            ) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                    if '"content":"' in line and '"role":"assistant"' not in line:
                        first_content.set()

        non_streaming: list[httpx.Response] = []
        threads = [
            threading.Thread(target=streaming),
            threading.Thread(
                target=lambda: non_streaming.append(
                    httpx.post(f"{s.url}{CHAT}", json=body, headers=s.headers(), timeout=120)
                )
            ),
        ]
        for t in threads:
            t.start()
        assert first_content.wait(30), "the stream never started"
        deadline = time.monotonic() + 30
        while sequences_in_engine(s) < 2:  # the other request must be in flight too, not on its way
            assert time.monotonic() < deadline, "the non-streaming request never reached the engine"
            time.sleep(0.02)

        s.process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        while httpx.get(f"{s.url}/ready", timeout=5).status_code != 503:
            assert time.monotonic() - sent < 2, "readiness did not turn 503 within 2 s of SIGTERM"
            time.sleep(0.02)
        refused = httpx.post(f"{s.url}{CHAT}", json=body, headers=s.headers(), timeout=10)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "shutting_down"
        assert "retry-after" in refused.headers
        assert lines[-1] != "data: [DONE]", "the stream ended before the drain was observed"

        for t in threads:
            t.join(120)
        assert lines[-1] == "data: [DONE]"
        final = json.loads(lines[-2][len("data: ") :])
        assert final["choices"][0]["finish_reason"] == "length"
        assert final["usage"]["completion_tokens"] == max_tokens  # ran to the end, not cut short
        assert non_streaming and non_streaming[0].status_code == 200, non_streaming[0].text
        assert non_streaming[0].json()["usage"]["completion_tokens"] == max_tokens
        assert s.process.wait(30) == 0
    finally:
        stop_server(s)
