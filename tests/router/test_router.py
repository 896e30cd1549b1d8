"""Two tiny replicas behind a real vllm-router, started as a user would: `deploy/replicas.py`.

What goes through the router must be what one replica answers; the load must spread; a killed
replica must be taken out while the other keeps serving; a draining one must stop receiving
requests once the router's next health check sees its `/ready` at 503. All on 127.0.0.1, every
loop bounded in count and time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL, free_port

ROOT = Path(__file__).resolve().parents[2]
HEALTH_INTERVAL_S = 1  # the router's /ready checks; it takes a replica out after two failures
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Cluster:
    url: str
    replicas: list[dict]  # name, url, pid, log
    launcher: subprocess.Popen
    log: Path

    def replica_requests(self, i: int) -> list[dict]:
        """The completions replica `i` served or refused, from its access log, in order."""
        lines = Path(self.replicas[i]["log"]).read_text(errors="replace").splitlines()
        records = [
            json.loads(line.split("mixtral_server.access: ", 1)[1])
            for line in lines
            if "mixtral_server.access: " in line
        ]
        return [r for r in records if r["path"].startswith("/v1/") and r["path"].endswith("completions")]

    def workers(self) -> dict[str, bool]:
        """The router's view: replica url -> healthy."""
        body = httpx.get(f"{self.url}/workers", timeout=5).json()
        return {w["url"]: w["is_healthy"] for w in body["workers"]}


def start_cluster(model_dir: Path, tmp: Path, policy: str) -> Cluster:
    port = free_port()
    status = tmp / "status.json"
    cmd = [
        sys.executable, "deploy/replicas.py", "--replicas", "2", "--port", str(port), "--replica-port", "0",
        "--policy", policy, "--health-interval-s", str(HEALTH_INTERVAL_S), "--log-dir", str(tmp),
        "--status-file", str(status), "--startup-timeout-s", "120",
        "--", "--model", str(model_dir), "--dtype", "float32", "--served-model-name", MODEL,
        "--max-model-len", "512", "--kv-cache-memory-gb", "0.05", "--max-num-seqs", "16",
    ]  # fmt: skip
    log = tmp / "launcher.log"
    env = os.environ | {"MIXTRAL_API_KEY": API_KEY}
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 150
    while not status.exists():
        if launcher.poll() is not None or time.monotonic() > deadline:
            launcher.kill()
            raise RuntimeError(f"deploy/replicas.py did not get ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    info = json.loads(status.read_text())
    return Cluster(info["router"]["url"], info["replicas"], launcher, log)


def stop_cluster(cluster: Cluster) -> None:
    if cluster.launcher.poll() is None:
        cluster.launcher.send_signal(signal.SIGTERM)
        try:
            cluster.launcher.wait(60)
        except subprocess.TimeoutExpired:
            cluster.launcher.kill()
    for replica in cluster.replicas:  # none is left behind
        assert not pid_alive(replica["pid"]), replica


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.fixture(scope="module")
def cluster(hf_dir, tmp_path_factory):
    running = start_cluster(hf_dir, tmp_path_factory.mktemp("cluster"), "cache_aware")
    yield running
    stop_cluster(running)


@pytest.fixture
def fresh_cluster(hf_dir, tmp_path):
    """Its own two replicas, for the tests that take one down."""
    running = start_cluster(hf_dir, tmp_path, "round_robin")
    yield running
    stop_cluster(running)


def chat(content: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 12,
            "temperature": 0} | extra  # fmt: skip


def streamed_text(client: httpx.Client, url: str, body: dict) -> str:
    parts = []
    with client.stream(
        "POST", f"{url}/v1/chat/completions", json=body | {"stream": True}, headers=HEADERS
    ) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        for choice in json.loads(line[6:])["choices"]:
            parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


def test_replies_through_the_router_are_a_replicas_replies(cluster):
    direct = cluster.replicas[0]["url"]
    with httpx.Client(timeout=30) as client:  # one keep-alive connection, as the SDKs
        for i in range(4):
            body = chat(f"Tell me about the number {i}.")
            via = client.post(f"{cluster.url}/v1/chat/completions", json=body, headers=HEADERS)
            alone = client.post(f"{direct}/v1/chat/completions", json=body, headers=HEADERS)
            assert via.status_code == alone.status_code == 200
            assert via.json()["choices"] == alone.json()["choices"]
            assert via.json()["usage"] == alone.json()["usage"]
            assert (
                streamed_text(client, cluster.url, body) == alone.json()["choices"][0]["message"]["content"]
            )
        text = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        via = client.post(f"{cluster.url}/v1/completions", json=text, headers=HEADERS)
        alone = client.post(f"{direct}/v1/completions", json=text, headers=HEADERS)
        assert via.json()["choices"] == alone.json()["choices"]
        assert client.get(f"{cluster.url}/v1/models", headers=HEADERS).json()["data"][0]["id"] == MODEL
        # The key is the client's, passed through: the router adds none and strips none.
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = client.post(f"{cluster.url}/v1/chat/completions", json=chat("hi"), headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        # Our typed 400 comes back as it is.
        r = client.post(
            f"{cluster.url}/v1/chat/completions", json=chat("hi") | {"messages": []}, headers=HEADERS
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def served(replica_url: str) -> float:
    """Finished choices a replica counted, read from its /metrics, open without the key
    (`open_metrics`, as deploy/replicas.py runs them)."""
    text = httpx.get(f"{replica_url}/metrics", timeout=10).text
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("mixtral:request_success_total{")
    )


def test_the_load_spreads_over_both_replicas(cluster):
    urls = [r["url"] for r in cluster.replicas]
    for url in urls:  # open_metrics opens the metrics and the load, nothing else
        assert httpx.get(f"{url}/get_load", timeout=5).status_code == 200
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 401
    before = [served(url) for url in urls]
    errors: list[object] = []

    def client(k: int) -> None:
        with httpx.Client(timeout=60) as c:
            for i in range(6):
                body = chat(f"{uuid.uuid4().hex} Question {k}-{i}: what is {k} times {i}?", max_tokens=6)
                r = c.post(f"{cluster.url}/v1/chat/completions", json=body, headers=HEADERS)
                if r.status_code != 200:
                    errors.append(r.text)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    counts = [served(url) - b for url, b in zip(urls, before, strict=True)]
    assert sum(counts) == 24, counts
    assert min(counts) >= 6, counts  # cache_aware with no shared prefix balances by load


def test_a_killed_replica_is_taken_out_and_the_other_keeps_serving(fresh_cluster):
    body = chat("Say something long.", max_tokens=300, min_tokens=300, ignore_eos=True)
    with httpx.Client(timeout=30) as client:
        # A stream through the router: the replica carrying it dies, and the client sees an
        # error (a cut body), not a hang and not a reply that looks whole.
        with client.stream("POST", f"{fresh_cluster.url}/v1/chat/completions", json=body | {"stream": True},
                           headers=HEADERS) as r:  # fmt: skip
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            loads = [
                httpx.get(f"{rep['url']}/get_load", timeout=5).json()["load"]
                for rep in fresh_cluster.replicas
            ]
            assert sorted(loads) == [0, 1], loads
            dead, alive = fresh_cluster.replicas if loads[0] else fresh_cluster.replicas[::-1]
            os.kill(dead["pid"], signal.SIGKILL)
            seen = []
            with pytest.raises(httpx.HTTPError):
                for line in lines:
                    seen.append(line)
            assert "data: [DONE]" not in seen
        killed = time.monotonic()
        codes = []
        while time.monotonic() - killed < 20 and len(codes) < 200:
            codes.append(client.post(f"{fresh_cluster.url}/v1/chat/completions", json=chat("hello"),
                                     headers=HEADERS).status_code)  # fmt: skip
            if fresh_cluster.workers().get(dead["url"]) is False and len(codes) >= 10:
                break
            time.sleep(0.05)
        taken_out = time.monotonic() - killed
        assert set(codes) == {200}, codes  # the router retried what reached the dead one
        assert fresh_cluster.workers() == {dead["url"]: False, alive["url"]: True}
        # two failed checks, each within the interval plus the connection error's time
        assert taken_out < 2 * HEALTH_INTERVAL_S + 5, taken_out
        live = fresh_cluster.replicas.index(alive)
        before = len(fresh_cluster.replica_requests(live))
        for _ in range(5):
            r = client.post(f"{fresh_cluster.url}/v1/chat/completions", json=chat("again"), headers=HEADERS)
            assert r.status_code == 200
        # all on the live one (its access-log line follows the response by a moment)
        assert settles(lambda: len(fresh_cluster.replica_requests(live))) == before + 5
    assert fresh_cluster.launcher.poll() is None  # one replica left: the launcher keeps serving


def test_a_draining_replica_gets_no_requests_after_the_routers_next_check(fresh_cluster):
    draining = fresh_cluster.replicas[0]
    long = chat("Count slowly.", max_tokens=400, min_tokens=400, ignore_eos=True)
    with (
        httpx.Client(timeout=60) as slow,
        httpx.Client(timeout=30) as client,
        # A stream read slowly keeps the draining replica busy (and so still listening).
        slow.stream(
            "POST", f"{draining['url']}/v1/chat/completions", json=long | {"stream": True}, headers=HEADERS
        ) as stream,  # fmt: skip
    ):
        chunks = stream.iter_lines()
        next(chunks)
        os.kill(draining["pid"], signal.SIGTERM)
        sigterm = time.monotonic()
        reached_before_out, out_after, codes = None, None, []
        while time.monotonic() - sigterm < 8 and len(codes) < 300:
            r = client.post(f"{fresh_cluster.url}/v1/chat/completions", json=chat("hi", max_tokens=2),
                            headers=HEADERS)  # fmt: skip
            codes.append(r.status_code)
            next(chunks)  # one line of the slow stream per request
            if out_after is None and fresh_cluster.workers().get(draining["url"]) is False:
                out_after = time.monotonic() - sigterm
                reached_before_out = settles(lambda: len(refused(fresh_cluster)))
            time.sleep(0.02)
        reached_at_end = settles(lambda: len(refused(fresh_cluster)))
        assert out_after is not None, "the router never took the draining replica out"
        rest = [line for line in chunks if line]  # the in-flight stream finishes whole despite the drain
        assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in "".join(rest)
    assert set(codes) == {200}, codes  # the router's retries hide the 503 shutting_down
    assert out_after <= 2 * HEALTH_INTERVAL_S + 2, out_after
    assert reached_at_end == reached_before_out  # none after the router took it out
    print(
        f"\ndrain: out after {out_after:.2f} s; {reached_at_end} requests reached it, got 503, were retried"
    )
    assert [r["status"] for r in fresh_cluster.replica_requests(0)].count(200) == 1  # the slow stream


def settles(read, timeout: float = 3.0):
    """`read()` once it has stopped changing for 0.5 s (bounded by `timeout`)."""
    value, since, deadline = read(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - since < 0.5 and time.monotonic() < deadline:
        time.sleep(0.1)
        if (now := read()) != value:
            value, since = now, time.monotonic()
    return value


def refused(cluster: Cluster) -> list[dict]:
    """What reached the draining replica 0 after SIGTERM: each refused with 503 `shutting_down`."""
    return [r for r in cluster.replica_requests(0) if r["status"] == 503]
