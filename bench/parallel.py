"""Tensor and expert parallelism on this CPU: one rank with every core against two ranks of one core each.

    python -m bench.parallel                 # about 2 minutes on 2 cores

The "small" checkpoint of PERFORMANCE.md (random weights, bf16). Three engines, each built in a
fresh process (`bench.engine` says why), one after the other in one run:
- TP=1 with all the cores (2 threads here);
- TP=2 over gloo, one thread per rank (`engine.workers.threads_per_rank`);
- EP=2 over gloo (whole experts per rank), one thread per rank.
Load: 64-token prompts, exactly 64 output tokens (ignore_eos), greedy; "1 client" runs 4 requests
one after another, "32 clients" 32 at once. Figures: output tokens/s over the whole load, the
mean step time at batch 1, and rank 0's cost of handing a step to the workers (packing it into
shared memory and waking them, `engine.step_channel`), per step at batch 1. Ratios are against
TP=1 in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.serve import free_port

PROMPT_LEN = 64
OUTPUT_LEN = 64
SERIAL_REQUESTS = 4


@dataclass(frozen=True)
class Figures:
    name: str
    tok_per_s: dict[int, float]  # by clients
    step_ms_b1: float  # mean engine step at batch 1
    send_us_b1: float | None  # mean rank-0 hand-off per step at batch 1 (None: one rank)


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(100, 31000) for _ in range(PROMPT_LEN - 1)] for _ in range(count)]


def _measure(path: str, tp: int, ep: bool, clients: list[int]) -> Figures:
    import torch  # in the fresh process only

    from engine.config import EngineArgs
    from engine.factory import build_engine
    from engine.sampling_params import SamplingParams
    from tokenization.loader import load_prompt_encoder

    if tp == 1:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    args = EngineArgs(
        dtype="bfloat16",
        max_model_len=512,
        kv_cache_memory_gb=0.5,
        tensor_parallel_size=tp,
        expert_parallel=ep,
    )
    engine, _ = build_engine(Path(path), args, load_prompt_encoder(Path(path)))
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, min_tokens=OUTPUT_LEN, ignore_eos=True)
    tok_per_s: dict[int, float] = {}
    step_ms = 0.0
    send_us: float | None = None
    try:
        for n in clients:
            waves = [[p] for p in _prompts(SERIAL_REQUESTS, n)] if n == 1 else [_prompts(n, n)]
            produced, start = 0, time.perf_counter()
            decode_steps: list[float] = []
            for w, wave in enumerate(waves):
                for i, prompt in enumerate(wave):
                    engine.add_request(f"c{n}-w{w}-r{i}", prompt, params)
                while engine.has_work:
                    t = time.perf_counter()
                    outs = engine.step()
                    decode_steps.append(time.perf_counter() - t)
                    produced += sum(len(o.new_token_ids) for o in outs)
            tok_per_s[n] = produced / (time.perf_counter() - start)
            if n == 1:
                steps = decode_steps[1:]  # the prefill step aside
                step_ms = 1000 * statistics.mean(steps)
                if engine.workers is not None:
                    send_us = _mean_send_us(engine, params)
    finally:
        engine.close()
    name = "TP=1" if tp == 1 else f"{'EP' if ep else 'TP'}={tp}"
    return Figures(name, tok_per_s, step_ms, send_us)


def _mean_send_us(engine, params) -> float:  # type: ignore[no-untyped-def]
    """Rank 0's hand-off per decode step of one request (wrapping `WorkerGroup.send`)."""
    recorded: list[float] = []
    send = engine.workers.send

    def timed(*step):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        send(*step)
        recorded.append(time.perf_counter() - t)

    engine.workers.send = timed
    engine.add_request("handoff", _prompts(1, 99)[0], params)
    while engine.has_work:
        engine.step()
    engine.workers.send = send
    return 1e6 * statistics.mean(recorded[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,32")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="reuse (or write) the small checkpoint here"
    )
    opts = parser.parse_args()
    clients = [int(c) for c in opts.clients.split(",")]
    from bench.small_checkpoint import write_small_checkpoint

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_small_checkpoint(opts.checkpoint or Path(tmp) / "small"))
        spawn = multiprocessing.get_context("spawn")
        results = []
        for tp, ep in ((1, False), (2, False), (2, True)):
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                results.append(pool.submit(_measure, path, tp, ep, clients).result())
    base = results[0]
    print(f"# parallel benchmark: small Mixtral, bf16, CPU, {cores} cores; gloo between ranks")
    print(
        f"# {PROMPT_LEN}-token prompts, exactly {OUTPUT_LEN} tokens out; 1 client: {SERIAL_REQUESTS} in a row"
    )
    cols = " | ".join(f"{n} client{'s' * (n > 1)} tok/s (ratio)" for n in clients)
    print(f"\n| engine | threads per rank | {cols} | step at batch 1 ms | hand-off per step us |")
    print("|---|---:|" + "---:|" * len(clients) + "---:|---:|")
    for r in results:
        threads = cores if r.name == "TP=1" else max(1, cores // 2)
        figures = " | ".join(
            f"{r.tok_per_s[n]:.1f} ({r.tok_per_s[n] / base.tok_per_s[n]:.2f}x)" for n in clients
        )
        handoff = "" if r.send_us_b1 is None else f"{r.send_us_b1:.0f}"
        print(f"| {r.name} | {threads} | {figures} | {r.step_ms_b1:.1f} | {handoff} |")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        latency = pool.submit(_all_reduce_latency_us).result()
    print(
        f"\ngloo all-reduce of one token's hidden state (512 bf16) between 2 ranks: {latency:.0f} us "
        f"(a step of the small model makes {2 * 8 + 2} collectives: 2 per layer, the embedding, the logits)"
    )


def _all_reduce_latency_us(rounds: int = 2000) -> float:
    """Mean latency of a 1 x 512 bf16 gloo all-reduce between two one-thread processes."""
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_reduce_loop, args=(r, port, rounds, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return queue.get()


def _reduce_loop(rank: int, port: int, rounds: int, queue) -> None:  # type: ignore[no-untyped-def]
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x = torch.ones(1, 512, dtype=torch.bfloat16)
    for _ in range(100):
        dist.all_reduce(x)
    t = time.perf_counter()
    for _ in range(rounds):
        dist.all_reduce(x)
    if rank == 0:
        queue.put(1e6 * (time.perf_counter() - t) / rounds)
    dist.destroy_process_group()
