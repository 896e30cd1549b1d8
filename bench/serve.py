"""Serving benchmark: N concurrent streaming clients against any OpenAI-compatible server.

    python -m bench.serve --base-url http://127.0.0.1:8000 --model small --clients 1,8,32
    python -m bench.serve --spawn-small --with-engine --clients 1,8,32

Like vLLM's `benchmark_serving`: every request has a prompt of exactly `--prompt-len` tokens (token
ids sent as `prompt` to /v1/completions; with `--chat`, random words to /v1/chat/completions, so
the length is only approximate) and produces exactly `--output-len` tokens (`max_tokens` =
`min_tokens`, `ignore_eos`), temperature 0, streamed. Each client sends `--requests-per-client`
requests one after another; a run stops issuing requests after `--duration` seconds. Reported per
concurrency level (median of `--repeats` runs by throughput): output tok/s and requests/s over the
run's wall time, TTFT and inter-token latency p50/p99 (between content chunks), failures, and the
client's own CPU time (it shares the machine's cores with the server).

`--spawn-small` writes PERFORMANCE.md's "small" random Mixtral checkpoint, starts our server on
127.0.0.1 with the engine settings `bench.engine` uses, runs the clients and stops it (its peak
RSS is printed). `--with-engine` then runs `python -m bench.engine` on the same checkpoint (after
the server has stopped, so they never share the CPU) and prints HTTP throughput as a fraction of
engine-only throughput at each concurrency.

The client needs only httpx (no torch): SSE lines are parsed here; tokens are counted from the
final `usage` (`stream_options.include_usage`) when the server sends one, else one per chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the of and to in is for on that by this with you it not or be are from at as your all have new "
    "more an was we will home can us about if page my has search free but our one other do no time "
    "they site he up may what which their news out use any there see only so his when contact here"
)


@dataclass
class Sample:
    """One request as the client saw it."""

    ok: bool
    tokens: int = 0
    prompt_tokens: int | None = None
    ttft: float | None = None  # seconds from sending to the first content chunk
    itl: list[float] = field(default_factory=list)  # seconds between content chunks
    error: str = ""


@dataclass
class RunResult:
    clients: int
    wall: float
    cpu: float  # this process's CPU seconds over the run
    samples: list[Sample]
    server_cpu: tuple[float, float] | None = None  # spawned server: (event-loop thread, all other threads)

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    @property
    def tok_per_s(self) -> float:
        return sum(s.tokens for s in self.ok) / self.wall

    @property
    def req_per_s(self) -> float:
        return len(self.ok) / self.wall


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def token_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """Distinct prompts of exactly `length` ids: BOS, then random ids of Mistral's v1 vocabulary drawn
    as `bench.engine` draws them, so the two benchmarks see the same kind of input."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(100, 31000) for _ in range(length - 1)] for _ in range(count)]


def word_prompts(count: int, length: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = WORDS.split()
    return [" ".join(rng.choice(words) for _ in range(max(1, length - 8))) for _ in range(count)]


class Client:
    """Builds request bodies and times one streamed request."""

    def __init__(self, opts: argparse.Namespace, model: str) -> None:
        self.opts = opts
        self.model = model
        path = "/v1/chat/completions" if opts.chat else "/v1/completions"
        self.url = opts.base_url.rstrip("/") + path
        self.headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}

    def body(self, prompt: list[int] | str) -> dict:
        o = self.opts
        body = {
            "model": self.model,
            "max_tokens": o.output_len,
            "min_tokens": o.output_len,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if o.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def prompts(self, count: int, seed: int) -> list:
        o = self.opts
        make = word_prompts if o.chat else token_prompts
        return make(count, o.prompt_len, seed)

    async def request(self, http: httpx.AsyncClient, prompt: list[int] | str) -> Sample:
        sample = Sample(ok=False)
        chunks = 0
        last = None
        start = time.perf_counter()
        try:
            async with http.stream("POST", self.url, json=self.body(prompt), headers=self.headers) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode("utf-8", "replace")
                    sample.error = f"HTTP {r.status_code}: {text[:200]}"
                    return sample
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if usage := chunk.get("usage"):
                        sample.tokens = usage.get("completion_tokens") or 0
                        sample.prompt_tokens = usage.get("prompt_tokens")
                    for choice in chunk.get("choices") or ():
                        content = choice["delta"].get("content") if self.opts.chat else choice.get("text")
                        if content:
                            now = time.perf_counter()
                            if last is None:
                                sample.ttft = now - start
                            else:
                                sample.itl.append(now - last)
                            last = now
                            chunks += 1
                        if choice.get("finish_reason") == "error":
                            sample.error = "finish_reason error"
        except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
            sample.error = f"{type(exc).__name__}: {str(exc)[:200]}"
            return sample
        sample.tokens = sample.tokens or chunks
        if not sample.error and sample.tokens != self.opts.output_len:
            sample.error = f"{sample.tokens} tokens instead of {self.opts.output_len}"
        sample.ok = not sample.error
        return sample


def thread_cpu(pid: int | None) -> tuple[float, float] | None:
    """CPU seconds of a local process: its main thread (uvicorn's event loop) and all the others
    (the engine thread, its OpenMP workers, `to_thread` workers), from /proc."""
    if pid is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    main = rest = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the thread ended
        seconds = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        if task.name == str(pid):
            main += seconds
        else:
            rest += seconds
    return main, rest


async def run_once(client: Client, clients: int, seed: int, requests_per_client: int) -> RunResult:
    o = client.opts
    prompts = client.prompts(clients * requests_per_client, seed)
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(o.timeout, connect=min(o.timeout, 30.0))
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        server0 = thread_cpu(o.server_pid)
        cpu0, t0 = time.process_time(), time.perf_counter()
        deadline = t0 + o.duration

        async def worker(i: int) -> None:
            for j in range(requests_per_client):
                if time.perf_counter() > deadline:
                    return
                samples.append(await client.request(http, prompts[i * requests_per_client + j]))

        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        server1 = thread_cpu(o.server_pid)
    server = (server1[0] - server0[0], server1[1] - server0[1]) if server0 and server1 else None
    return RunResult(clients, wall, cpu, samples, server)


async def run_levels(client: Client, levels: list[int]) -> list[RunResult]:
    o = client.opts
    await run_once(client, 4, seed=999, requests_per_client=1)  # warm-up (as bench.engine does)
    results = []
    for clients in levels:
        runs = [
            await run_once(client, clients, seed=clients * 100 + r, requests_per_client=o.requests_per_client)
            for r in range(o.repeats)
        ]
        results.append(sorted(runs, key=lambda run: run.tok_per_s)[len(runs) // 2])
    return results


def table(results: list[RunResult], system: str) -> list[str]:
    with_server = all(r.server_cpu is not None for r in results)
    extra = " server CPU s: event loop / engine + rest |" if with_server else ""
    lines = [
        "| system | clients | requests ok/failed | output tok/s | requests/s | TTFT p50/p99 ms "
        f"| inter-token p50/p99 ms | wall s | client CPU s (% of wall) |{extra}",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if with_server else ""),
    ]
    for r in results:
        ttft = [s.ttft * 1e3 for s in r.ok if s.ttft is not None]
        itl = [x * 1e3 for s in r.ok for x in s.itl]
        line = (
            f"| {system} | {r.clients} | {len(r.ok)}/{len(r.samples) - len(r.ok)} | {r.tok_per_s:.1f} | "
            f"{r.req_per_s:.2f} | {pct(ttft, 0.5):.1f} / {pct(ttft, 0.99):.1f} | "
            f"{pct(itl, 0.5):.1f} / {pct(itl, 0.99):.1f} | {r.wall:.2f} | {r.cpu:.2f} "
            f"({100 * r.cpu / r.wall:.0f}%) |"
        )
        if with_server and r.server_cpu is not None:
            line += f" {r.server_cpu[0]:.2f} / {r.server_cpu[1]:.2f} |"
        lines.append(line)
    return lines


def prompt_tokens_seen(results: list[RunResult]) -> str:
    counts = sorted({s.prompt_tokens for r in results for s in r.ok if s.prompt_tokens is not None})
    shown = ", ".join(map(str, counts[:3])) + (f" ... {counts[-1]}" if len(counts) > 3 else "")
    return f"# prompt tokens per request, as the server counted them: {shown or 'not reported'}"


def first_error(results: list[RunResult]) -> str | None:
    return next((s.error for r in results for s in r.samples if not s.ok), None)


# ---- our server, spawned -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_checkpoint(path: Path) -> Path:
    """In a child process, so this client process never loads torch."""
    code = (
        "import sys; from pathlib import Path; from bench.small_checkpoint import write_small_checkpoint; "
        "write_small_checkpoint(Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, check=True)
    return path


def start_server(checkpoint: Path, levels: list[int], opts: argparse.Namespace, log: Path):
    port = free_port()
    cmd = [
        sys.executable, "-m", "server", "--model", str(checkpoint), "--dtype", "bfloat16",
        "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max(levels)),
        "--max-num-batched-tokens", str(max(512, max(levels) * opts.prompt_len)), *opts.server_arg,
    ]  # fmt: skip
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, f"{url}/ready", log, "server")
    return proc, url, cmd


def wait_until_up(proc: subprocess.Popen, probe: str, log: Path, name: str, timeout: float = 300) -> None:
    """Until `probe` answers 200; SystemExit with the log's tail if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(probe, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{name} not ready in {timeout:g} s:\n{log.read_text()[-3000:]}")


def peak_rss_mib(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) / 1024 if match else None


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def engine_bench(checkpoint: Path, levels: list[int]) -> tuple[str, dict[int, float]]:
    cmd = [sys.executable, "-m", "bench.engine", "--clients", ",".join(map(str, levels))]
    cmd += ["--checkpoint", str(checkpoint)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench.engine failed:\n{done.stderr[-3000:]}")
    found = re.findall(r"^\| mixtral-server engine \| (\d+) \| ([0-9.]+) \|", done.stdout, re.M)
    return done.stdout.strip(), {int(c): float(t) for c, t in found}


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--model", help="model id to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    p.add_argument("--requests-per-client", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs per level; the median is reported")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="chat completions with random words")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--duration", type=float, default=300.0, help="no new requests after this, per run")
    p.add_argument("--spawn-small", action="store_true", help="start our server on the small checkpoint")
    p.add_argument("--checkpoint", type=Path, help="with --spawn-small: reuse (or write) it here")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the spawned server")
    p.add_argument("--with-engine", action="store_true", help="with --spawn-small: also run bench.engine")
    p.add_argument(
        "--rounds", type=int, default=1, help="with --spawn-small: repeat server + engine, report each ratio"
    )
    opts = p.parse_args(argv)
    if opts.with_engine and (opts.prompt_len, opts.output_len) != (64, 64):
        p.error("--with-engine compares with bench.engine, which measures 64-token prompts and outputs only")
    opts.server_pid = None  # set when we spawn the server: its threads' CPU time is then reported
    return opts


async def resolve_model(opts: argparse.Namespace) -> str:
    if opts.model:
        return opts.model
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(opts.base_url.rstrip("/") + "/v1/models", headers=headers)
        r.raise_for_status()
        return r.json()["data"][0]["id"]


def bench(opts: argparse.Namespace, levels: list[int]) -> list[RunResult]:
    async def go() -> list[RunResult]:
        return await run_levels(Client(opts, await resolve_model(opts)), levels)

    return asyncio.run(go())


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    levels = [int(c) for c in opts.clients.split(",")]
    kind = "chat completions, random words" if opts.chat else "completions, prompt token ids"
    header = [
        f"# serving benchmark: {kind}; {opts.prompt_len}-token prompts, exactly {opts.output_len} "
        f"output tokens (ignore_eos), streamed; {opts.requests_per_client} request(s) per client, "
        f"median of {opts.repeats} runs",
    ]
    if not opts.spawn_small:
        results = bench(opts, levels)
        lines = [
            *header,
            f"# server: {opts.base_url}",
            prompt_tokens_seen(results),
            "",
            *table(results, "HTTP"),
        ]
        print("\n".join(lines))
        if err := first_error(results):
            print(f"\nfirst failure: {err}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(opts.checkpoint or Path(tmp) / "small")
        opts.model = opts.model or checkpoint.name
        ratios: dict[int, list[float]] = {c: [] for c in levels}
        for round_ in range(1, opts.rounds + 1):
            if opts.rounds > 1:
                print(f"\n# ==== round {round_} of {opts.rounds}\n", flush=True)
            lines, ratio = spawned_round(opts, levels, checkpoint, Path(tmp) / f"server-{round_}.log", header)
            print("\n".join(lines), flush=True)
            for clients, value in ratio.items():
                ratios[clients].append(value)
    if opts.with_engine and opts.rounds > 1:
        print(f"\n# HTTP / engine throughput over {opts.rounds} rounds (each pair measured back to back)\n")
        print("| clients | per round | median |\n|---:|---|---:|")
        for clients, values in ratios.items():
            if values:
                each = " / ".join(f"{100 * v:.0f}%" for v in values)
                print(f"| {clients} | {each} | {100 * statistics.median(values):.0f}% |")


def spawned_round(
    opts: argparse.Namespace, levels: list[int], checkpoint: Path, log: Path, header: list[str]
) -> tuple[list[str], dict[int, float]]:
    """Our server on the checkpoint, the clients, then (server stopped) bench.engine: the report."""
    proc, opts.base_url, cmd = start_server(checkpoint, levels, opts, log)
    opts.server_pid = proc.pid
    try:
        results = bench(opts, levels)
        peak = peak_rss_mib(proc.pid)
    finally:
        stop(proc)
        opts.server_pid = None
    server_cmd = " ".join(["python", *cmd[1:]]).replace(str(checkpoint), "DIR")
    lines = [*header, f"# server: {server_cmd}", prompt_tokens_seen(results)]
    if peak is not None:
        lines.append(f"# server peak RSS: {peak:.0f} MiB")
    lines += ["", *table(results, "mixtral-server HTTP")]
    if err := first_error(results):
        lines.append(f"\nfirst failure: {err}")
    ratio: dict[int, float] = {}
    if opts.with_engine:
        engine_out, engine_tps = engine_bench(checkpoint, levels)
        lines += ["", "## engine only: python -m bench.engine (same checkpoint, after the server stopped)"]
        lines += ["", engine_out, "", "| clients | HTTP tok/s | engine tok/s | HTTP / engine |"]
        lines.append("|---:|---:|---:|---:|")
        for r in results:
            if r.clients in engine_tps:
                ratio[r.clients] = r.tok_per_s / engine_tps[r.clients]
                lines.append(
                    f"| {r.clients} | {r.tok_per_s:.1f} | {engine_tps[r.clients]:.1f} | "
                    f"{100 * ratio[r.clients]:.0f}% |"
                )
    return lines, ratio


if __name__ == "__main__":
    main()
