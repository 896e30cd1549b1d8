"""Prefix-aware routing, measured: two replicas behind vllm-router, round-robin against cache-aware.

    python -m bench.replicas                      # the "small" checkpoint, about 3 minutes

A chat workload in which groups of requests share a long few-shot prefix (a system prompt with
worked examples, then a short question), as a product's prompt templates do. The prompts are
text, since the router's cache-aware policy keys on the request's text. Each policy gets a fresh
pair of replicas (`deploy/replicas.py`, one torch thread each on this 2-core machine) and the
same requests in the same order; the KV pool of each replica holds about half of the groups'
prefixes, so where a group's requests land decides what the prefix cache can keep.

Printed for each policy: the prefix-cache hit rate (prompt tokens served from cached blocks, from
each replica's `mixtral:prefix_cache_*` counters) and the prompt tokens computed, TTFT p50/p99,
output tokens per second over the run, and the requests each replica served; then cache-aware's
ratios to round-robin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.serve import WORDS, free_port, pct, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MODEL = "small-mixtral"
POLICIES = ("round_robin", "cache_aware")


@dataclass
class Outcome:
    policy: str
    wall_s: float
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    hits: float = 0.0
    queries: float = 0.0
    per_replica: list[float] = field(default_factory=list)


def few_shot_prefix(group: int, words: int, rng: random.Random) -> str:
    """A task instruction and worked examples, about `words` words, distinct per group."""
    vocab = WORDS.split()
    lines = [f"You are assistant number {group}. Task {group}: answer in the style of the examples below."]
    while sum(len(line.split()) for line in lines) < words:
        question = " ".join(rng.choice(vocab) for _ in range(12))
        answer = " ".join(rng.choice(vocab) for _ in range(20))
        lines.append(f"Q: {question}\nA: {answer}")
    return "\n\n".join(lines)


def workload(opts: argparse.Namespace) -> list[list[dict]]:
    """Each client's requests (chat messages), the same for every policy."""
    rng = random.Random(opts.seed)
    prefixes = [few_shot_prefix(g, opts.prefix_words, rng) for g in range(opts.groups)]
    vocab = WORDS.split()
    plan = []
    for _ in range(opts.clients):
        requests = []
        for _ in range(opts.requests_per_client):
            group = rng.randrange(opts.groups)
            question = " ".join(rng.choice(vocab) for _ in range(10))
            requests.append(
                [
                    {"role": "system", "content": prefixes[group]},
                    {"role": "user", "content": f"Q: {question}"},
                ]
            )
        plan.append(requests)
    return plan


def start_cluster(opts: argparse.Namespace, checkpoint: Path, policy: str, work: Path):
    status = work / f"{policy}.json"
    port = free_port()
    cmd = [
        sys.executable, "deploy/replicas.py", "--replicas", "2", "--port", str(port), "--replica-port", "0",
        "--policy", policy, "--log-dir", str(work / policy), "--status-file", str(status),
        "--", "--model", str(checkpoint), "--dtype", "bfloat16", "--served-model-name", MODEL,
        "--max-model-len", "2048", "--kv-cache-memory-gb", str(opts.kv_cache_gb), "--max-num-seqs", "16",
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(opts.threads_per_replica)}
    log = (work / f"{policy}-launcher.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while not status.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(
                f"deploy/replicas.py failed:\n{(work / f'{policy}-launcher.log').read_text()[-3000:]}"
            )
        time.sleep(0.5)
    return proc, json.loads(status.read_text())


def stop_cluster(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()


def counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text  # open: the replicas run with open_metrics
    wanted = ("mixtral:prefix_cache_hits_total", "mixtral:prefix_cache_queries_total")
    values = {name: 0.0 for name in wanted}
    values["served"] = 0.0
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            values[name] = float(value)
        elif name.startswith("mixtral:request_success_total{"):
            values["served"] += float(value)
    return values


async def one(
    http: httpx.AsyncClient, url: str, messages: list[dict], opts: argparse.Namespace, out: Outcome
) -> None:
    n = opts.output_len
    body = {"model": MODEL, "messages": messages, "max_tokens": n, "min_tokens": n, "ignore_eos": True,
            "temperature": 0, "stream": True}  # fmt: skip
    start = time.perf_counter()
    first = None
    chunks = 0
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                out.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:])["choices"]:
                    if choice["delta"].get("content"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter() - start
    except httpx.HTTPError as exc:
        out.errors.append(f"{type(exc).__name__}: {exc}")
        return
    if first is not None:
        out.ttft.append(first)
    out.tokens += chunks


async def drive(url: str, plan: list[list[dict]], opts: argparse.Namespace, out: Outcome) -> None:
    async def client(requests: list[list[dict]]) -> None:
        async with httpx.AsyncClient(timeout=120) as http:  # one keep-alive connection per client
            for messages in requests:
                await one(http, url, messages, opts, out)

    await asyncio.wait_for(asyncio.gather(*(client(r) for r in plan)), timeout=opts.max_run_s)


def run_policy(
    opts: argparse.Namespace, checkpoint: Path, policy: str, plan: list[list[dict]], work: Path
) -> Outcome:
    proc, status = start_cluster(opts, checkpoint, policy, work)
    try:
        replicas = [r["url"] for r in status["replicas"]]
        before = [counters(u) for u in replicas]
        start = time.perf_counter()
        out = Outcome(policy, 0.0)
        asyncio.run(drive(status["router"]["url"], plan, opts, out))
        out.wall_s = time.perf_counter() - start
        after = [counters(u) for u in replicas]
        for b, a in zip(before, after, strict=True):
            out.hits += a["mixtral:prefix_cache_hits_total"] - b["mixtral:prefix_cache_hits_total"]
            out.queries += a["mixtral:prefix_cache_queries_total"] - b["mixtral:prefix_cache_queries_total"]
            out.per_replica.append(a["served"] - b["served"])
        return out
    finally:
        stop_cluster(proc)


def report(outcomes: list[Outcome]) -> list[str]:
    lines = [
        "| policy | requests | errors | prefix-cache hit rate | prompt tokens computed | TTFT p50 | TTFT p99 "
        "| output tok/s | requests per replica |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        rate = o.hits / o.queries if o.queries else float("nan")
        spread = " / ".join(f"{n:.0f}" for n in o.per_replica)
        lines.append(
            f"| {o.policy} | {len(o.ttft)} | {len(o.errors)} | {rate:.1%} | {o.queries - o.hits:,.0f} "
            f"| {pct(o.ttft, 0.5) * 1e3:.0f} ms | {pct(o.ttft, 0.99) * 1e3:.0f} ms "
            f"| {o.tokens / o.wall_s:.1f} | {spread} |"
        )
    rr, ca = outcomes
    rate = (
        (ca.hits / ca.queries) / (rr.hits / rr.queries)
        if rr.hits and rr.queries and ca.queries
        else float("nan")
    )
    lines.append("")
    lines.append(
        f"cache_aware / round_robin: hit rate {rate:.2f}x, prompt tokens computed "
        f"{(ca.queries - ca.hits) / (rr.queries - rr.hits):.2f}x, "
        f"TTFT p50 {pct(ca.ttft, 0.5) / pct(rr.ttft, 0.5):.2f}x, "
        f"TTFT p99 {pct(ca.ttft, 0.99) / pct(rr.ttft, 0.99):.2f}x, "
        f"throughput {(ca.tokens / ca.wall_s) / (rr.tokens / rr.wall_s):.2f}x"
    )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="default: the small random Mixtral, written once")
    p.add_argument("--groups", type=int, default=8, help="distinct few-shot prefixes (default: 8)")
    p.add_argument(
        "--prefix-words", type=int, default=700, help="words per prefix (default: 700, ~1,000 tokens)"
    )
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default: 8)")
    p.add_argument("--requests-per-client", type=int, default=8, help="(default: 8)")
    p.add_argument("--output-len", type=int, default=16, help="tokens per reply (default: 16)")
    p.add_argument(
        "--kv-cache-gb", type=float, default=0.025, help="KV pool per replica (default: 0.025 GiB)"
    )
    p.add_argument("--threads-per-replica", type=int, default=1, help="OMP_NUM_THREADS of each (default: 1)")
    p.add_argument("--max-run-s", type=float, default=600, help="bound on each policy's run (default: 600)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    checkpoint = opts.checkpoint or write_checkpoint(ROOT / ".cache" / "bench-small-mixtral")
    plan = workload(opts)
    total = sum(len(r) for r in plan)
    print(f"{opts.groups} prefixes of ~{opts.prefix_words} words, {opts.clients} clients x "
          f"{opts.requests_per_client} requests ({total}), {opts.output_len} tokens each; "
          f"KV {opts.kv_cache_gb} GiB per replica; logs in {work}", flush=True)  # fmt: skip
    outcomes = []
    for policy in POLICIES:
        print(f"{policy}: starting two replicas and the router", flush=True)
        outcome = run_policy(opts, checkpoint, policy, plan, work)
        print(f"{policy}: {len(outcome.ttft)} requests in {outcome.wall_s:.1f} s", flush=True)
        if outcome.errors:
            print(f"  first error: {outcome.errors[0]}")
        outcomes.append(outcome)
    print("\n".join(report(outcomes)))


if __name__ == "__main__":
    main()
