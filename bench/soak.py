"""Soak test: a server under steady load with abandoned streams and bad requests, for minutes.

    python -m bench.soak --base-url http://127.0.0.1:8000 --duration 600
    python -m bench.soak --spawn-small --duration 600      # our server on the "small" checkpoint

First it measures the server's capacity: output tok/s with 32 streaming clients for
`--capacity-s` seconds. Then, for `--duration` seconds, `--clients` clients send requests at about
70% of that rate (open loop: each client keeps its own schedule), each client one keep-alive
httpx pool, as the SDKs are:
- 5% of requests are invalid (each of a few classes, each must get its 4xx);
- of the rest, half stream; 10% of the streams are abandoned after their first chunks;
- every valid request asks for exactly `OUTPUT_LEN` tokens (ignore_eos), as the capacity run did.

Reported: requests by outcome, unexpected errors by class (any 5xx, 429, a transport error, a
4xx to a valid request, a stream without `[DONE]`, a keep-alive connection the server closed
before its idle timeout), and the server's resident memory and KV cache usage at the start,
middle and end, then KV usage once idle. It passes (`passed`, exit 0) with 0 unexpected errors,
the resident memory at the end within 50 MB of the middle, and the KV cache back to 0 when idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.serve import start_server, stop, write_checkpoint

OUTPUT_LEN = 32
CAPACITY_CLIENTS = 32
LOAD_FRACTION = 0.7
INVALID_EVERY = 20  # 5% of requests
ABANDON_EVERY = 10  # 10% of streams
RSS_DRIFT_LIMIT = 50 * 1024 * 1024
# uvicorn closes a keep-alive connection idle this long (its default `timeout_keep_alive`, which
# our server keeps); a client that reconnects after a gap at least this long lost nothing.
KEEP_ALIVE_S = 5.0
WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "small",
    "birds",
    "sing",
)
# Bad requests a client really sends, with the status each must get.
USER = {"role": "user", "content": "a"}
INVALID = [
    ("malformed", 400, b'{"model": '),
    ("unknown-model", 404, {"model": "no-such-model", "messages": [USER]}),
    ("nan-top-p", 400, b'{"model": "MODEL", "messages": [{"role": "user", "content": "a"}], "top_p": NaN}'),
    ("last-assistant", 400, {"messages": [USER, {"role": "assistant", "content": "b"}]}),
    ("context-length", 400, {"messages": [USER], "max_tokens": 10**7}),
]  # fmt: skip


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    unexpected: Counter = field(default_factory=Counter)
    first_unexpected: dict[str, str] = field(default_factory=dict)
    tokens: int = 0

    def wrong(self, kind: str, detail: str) -> None:
        self.unexpected[kind] += 1
        self.first_unexpected.setdefault(kind, detail[:300])


@dataclass
class Probe:
    """The server's state, from /metrics."""

    rss: float
    kv_usage: float
    running: float


@dataclass
class Report:
    capacity_tok_s: float
    request_rate: float
    tally: Tally
    probes: dict[str, Probe]  # start, middle, end, idle

    @property
    def passed(self) -> bool:
        drift = abs(self.probes["end"].rss - self.probes["middle"].rss)
        return not self.tally.unexpected and drift <= RSS_DRIFT_LIMIT and self.probes["idle"].kv_usage == 0

    def lines(self) -> list[str]:
        out = [
            f"capacity: {self.capacity_tok_s:.1f} output tok/s at {CAPACITY_CLIENTS} streaming clients; "
            f"soak at {self.request_rate:.2f} requests/s ({LOAD_FRACTION:.0%})",
            "requests by outcome: " + ", ".join(f"{k} {v}" for k, v in sorted(self.tally.outcomes.items())),
            f"output tokens received: {self.tally.tokens}",
            "unexpected errors: "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.tally.unexpected.items())) or "none"),
        ]
        out += [f"  first {k}: {v}" for k, v in self.tally.first_unexpected.items()]
        out.append("| when | RSS MiB | KV usage | running |\n|---|---:|---:|---:|")
        for when, p in self.probes.items():
            out.append(f"| {when} | {p.rss / 2**20:.1f} | {p.kv_usage:.3f} | {p.running:.0f} |")
        drift = (self.probes["end"].rss - self.probes["middle"].rss) / 2**20
        out.append(f"RSS end - middle: {drift:+.1f} MiB (limit +-{RSS_DRIFT_LIMIT / 2**20:.0f})")
        out.append("passed" if self.passed else "FAILED")
        return out


@dataclass
class Connection:
    """One client's keep-alive connection, as far as the soak can tell from its side."""

    last_end: float | None = None  # when its last response ended (None: nothing sent yet)
    closed: bool = False  # the client closed it (an abandoned stream, a transport error)


class Soak:
    def __init__(self, base_url: str, model: str, api_key: str | None, seed: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.rng = random.Random(seed)  # prompts, bad-request classes, when streams are left, arrivals
        self.sent = self.streams = 0
        self.connections = 0  # TCP connections the soak's clients opened
        self.dropped = 0  # of those, reconnections after the server closed a busy keep-alive one

    def traced(self, conn: Connection) -> dict:
        """httpx extensions that count `conn`'s TCP connections: a new one is expected first, after
        the client closed the last, or after an idle gap the server's keep-alive timeout ends."""

        async def trace(event: str, info: dict) -> None:
            if event != "connection.connect_tcp.complete":
                return
            self.connections += 1
            idle = None if conn.last_end is None else time.monotonic() - conn.last_end
            if idle is not None and not conn.closed and idle < KEEP_ALIVE_S:
                self.dropped += 1
            conn.closed = False

        return {"trace": trace}

    def client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        return httpx.AsyncClient(base_url=self.base_url, headers=self.headers, limits=limits, timeout=120)

    def body(self, stream: bool) -> dict:
        words = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(4, 24)))
        return {
            "model": self.model, "messages": [{"role": "user", "content": words}], "max_tokens": OUTPUT_LEN,
            "min_tokens": OUTPUT_LEN, "ignore_eos": True, "temperature": 0.7, "stream": stream,
        }  # fmt: skip

    async def probe(self, http: httpx.AsyncClient) -> Probe:
        text = (await http.get("/metrics")).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key.removeprefix("mixtral:")] = float(value)
        return Probe(
            values["process_resident_memory_bytes"],
            values["kv_cache_usage_perc"],
            values["num_requests_running"],
        )

    async def one(self, http: httpx.AsyncClient, tally: Tally, conn: Connection) -> None:
        """The next request of the mix, checked. The mix is counted, not drawn, so that even a
        short run has every kind: every INVALID_EVERY-th request is bad, the others alternate
        between plain and streamed, and every ABANDON_EVERY-th stream is abandoned."""
        self.sent += 1
        try:
            if self.sent % INVALID_EVERY == 0:
                await self.invalid(http, tally, conn)
            elif self.sent % 2:
                await self.plain(http, tally, conn)
            else:
                self.streams += 1
                await self.stream(http, tally, conn, abandon=self.streams % ABANDON_EVERY == 0)
        except httpx.TransportError as exc:
            conn.closed = True
            tally.wrong(f"transport:{type(exc).__name__}", str(exc))
        conn.last_end = time.monotonic()

    async def invalid(self, http: httpx.AsyncClient, tally: Tally, conn: Connection) -> None:
        name, status, body = self.rng.choice(INVALID)
        if isinstance(body, bytes):
            raw = body.replace(b"MODEL", self.model.encode())
            headers = {"Content-Type": "application/json"}
            r = await http.post(
                "/v1/chat/completions", content=raw, headers=headers, extensions=self.traced(conn)
            )
        else:
            r = await http.post(
                "/v1/chat/completions", json={"model": self.model} | body, extensions=self.traced(conn)
            )
        if r.status_code == status and "error" in r.json():
            tally.outcomes["invalid-refused"] += 1
        else:
            tally.wrong(f"invalid:{name}:{r.status_code}", r.text)

    async def plain(self, http: httpx.AsyncClient, tally: Tally, conn: Connection) -> None:
        body = self.body(stream=False)
        r = await http.post("/v1/chat/completions", json=body, extensions=self.traced(conn))
        if r.status_code != 200:
            return tally.wrong(f"status:{r.status_code}", r.text)
        tally.outcomes["ok"] += 1
        tally.tokens += r.json()["usage"]["completion_tokens"]

    async def stream(self, http: httpx.AsyncClient, tally: Tally, conn: Connection, abandon: bool) -> None:
        leave_after = self.rng.randint(1, OUTPUT_LEN // 2)
        async with http.stream(
            "POST", "/v1/chat/completions", json=self.body(stream=True), extensions=self.traced(conn)
        ) as r:
            if r.status_code != 200:
                return tally.wrong(f"status:{r.status_code}", (await r.aread()).decode(errors="replace"))
            chunks, done = 0, False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunks += 1
                    choice = (json.loads(line[6:])["choices"] or [{}])[0]
                    if choice.get("finish_reason") == "error":
                        return tally.wrong("stream-error", line)
                    if abandon and chunks >= leave_after:
                        tally.outcomes["abandoned"] += 1
                        conn.closed = True
                        return  # leaving the block closes the response mid-stream
        if not done:
            return tally.wrong("stream-without-done", f"{chunks} chunks")
        tally.outcomes["ok-stream"] += 1
        tally.tokens += chunks - 1  # the first chunk carries only the role

    async def capacity(self, seconds: float) -> float:
        """Output tok/s with CAPACITY_CLIENTS closed-loop streaming clients for `seconds`."""
        tally = Tally()
        end = time.monotonic() + seconds

        async def loop() -> None:
            conn = Connection()
            async with self.client() as http:
                while time.monotonic() < end:
                    await self.stream(http, tally, conn, abandon=False)

        start = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(CAPACITY_CLIENTS)))
        if tally.unexpected:
            raise SystemExit(f"the capacity run failed: {dict(tally.unexpected)} {tally.first_unexpected}")
        return tally.tokens / (time.monotonic() - start)

    async def run(self, duration: float, capacity_s: float, clients: int) -> Report:
        async with self.client() as admin:
            capacity = await self.capacity(capacity_s)
            rate = LOAD_FRACTION * capacity / OUTPUT_LEN  # requests/s a full-length request mix costs
            tally = Tally()
            probes = {"start": await self.probe(admin)}
            start = time.monotonic()
            end = start + duration

            async def client_loop() -> None:
                interval = clients / rate
                due = start + self.rng.random() * interval
                conn = Connection()
                async with self.client() as http:
                    while due < end:
                        await asyncio.sleep(max(0.0, due - time.monotonic()))
                        await self.one(http, tally, conn)
                        due += self.rng.expovariate(1 / interval)  # Poisson arrivals per client

            async def middle() -> None:
                await asyncio.sleep(duration / 2)
                probes["middle"] = await self.probe(admin)

            self.connections = self.dropped = 0
            await asyncio.gather(middle(), *(client_loop() for _ in range(clients)))
            probes["end"] = await self.probe(admin)
            if self.dropped:
                tally.wrong(
                    "connection-dropped",
                    f"{self.dropped} of {self.connections} connections replaced one the server closed "
                    f"within {KEEP_ALIVE_S:g} s of its last response",
                )
            idle_by = time.monotonic() + 30
            while (probe := await self.probe(admin)).running and time.monotonic() < idle_by:
                await asyncio.sleep(0.2)
            probes["idle"] = probe
        return Report(capacity, rate, tally, probes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model id (default: the first of /v1/models)")
    p.add_argument("--api-key")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of soak after the capacity run")
    p.add_argument("--capacity-s", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spawn-small", action="store_true", help="start our server on the small checkpoint")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        if args.spawn_small:
            checkpoint = write_checkpoint(Path(tmp) / "small")
            opts = argparse.Namespace(prompt_len=64, server_arg=[])
            proc, args.base_url, _ = start_server(
                checkpoint, [CAPACITY_CLIENTS], opts, Path(tmp) / "server.log"
            )
            args.model = checkpoint.name
        try:
            model = args.model or httpx.get(f"{args.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
            soak = Soak(args.base_url, model, args.api_key, args.seed)
            report = asyncio.run(soak.run(args.duration, args.capacity_s, args.clients))
        finally:
            if proc is not None:
                stop(proc)
    print(f"# soak: {args.duration:g} s, {args.clients} clients, seed {args.seed}")
    print("\n".join(report.lines()))
    sys.exit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
