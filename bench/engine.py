"""Engine benchmark: concurrent requests through `AsyncEngine.generate`, against transformers `generate`.

    python bench/engine.py                  # 1, 8, 32 requests; baseline at batch 1 and 8

The "small" checkpoint of PERFORMANCE.md (random weights, bf16, CPU). Each request has its own
64-token prompt and produces exactly 64 tokens (ignore_eos), detokenized as it streams. Figures:
output tokens/s over the whole run, TTFT and inter-token latency (p50/p99). Baseline in the same
run: transformers `generate(do_sample=False, use_cache=True)`, same dtype, sdpa attention, one
warm-up, median of 3. Ratios are against transformers at batch 1.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.small_checkpoint import write_small_checkpoint
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import Engine
from engine.sampling_params import SamplingParams
from model.loader import load_model
from tokenization.loader import load_prompt_encoder

PROMPT_LEN = 64
OUTPUT_LEN = 64


@dataclass(frozen=True)
class RunStats:
    clients: int
    tok_per_s: float
    ttft_ms: list[float]
    itl_ms: list[float]


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(100, 31000) for _ in range(PROMPT_LEN - 1)] for _ in range(count)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_request(engine: AsyncEngine, prompt: list[int], rid: str, t0: float, stats: dict) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, min_tokens=OUTPUT_LEN, ignore_eos=True)
    last = None
    count = 0
    async for out in engine.generate(prompt, params, rid):
        now = time.perf_counter()
        count += len(out.new_token_ids)
        if last is None:
            stats["ttft"].append(now - t0)
        else:
            stats["itl"].append(now - last)
        last = now
    assert count == OUTPUT_LEN, count


async def run_clients(engine: AsyncEngine, clients: int, seed: int) -> RunStats:
    stats: dict[str, list[float]] = {"ttft": [], "itl": []}
    t0 = time.perf_counter()
    await asyncio.gather(
        *(one_request(engine, p, f"{seed}-{i}", t0, stats) for i, p in enumerate(prompts(clients, seed)))
    )
    wall = time.perf_counter() - t0
    return RunStats(
        clients,
        clients * OUTPUT_LEN / wall,
        [x * 1e3 for x in stats["ttft"]],
        [x * 1e3 for x in stats["itl"]],
    )


async def bench_engine(path: Path, concurrency: list[int], repeats: int) -> list[RunStats]:
    encoder = load_prompt_encoder(path)
    config = EngineConfig(
        max_model_len=PROMPT_LEN + OUTPUT_LEN,
        num_kv_blocks=max(concurrency) * 8 + 8,
        block_size=16,
        max_num_seqs=max(concurrency),
        max_num_batched_tokens=max(512, max(concurrency) * PROMPT_LEN),
        enable_prefix_caching=False,  # every prompt is distinct anyway; measure the plain path
    )
    engine = AsyncEngine(lambda: Engine(load_model(path, dtype="bfloat16"), config, encoder, eos_token_id=2))
    engine.start()
    await engine.wait_ready()
    await run_clients(engine, 4, seed=999)  # warm-up
    results = []
    for clients in concurrency:
        runs = [await run_clients(engine, clients, seed=clients * 100 + r) for r in range(repeats)]
        results.append(sorted(runs, key=lambda s: s.tok_per_s)[len(runs) // 2])
    await engine.shutdown()
    return results


def run_engine_bench(path: Path, concurrency: list[int], repeats: int) -> list[RunStats]:
    return asyncio.run(bench_engine(path, concurrency, repeats))


def bench_transformers(path: Path, batches: list[int], repeats: int) -> dict[int, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).eval()
    out = {}
    for batch in batches:
        ids = torch.tensor(prompts(batch, seed=batch))

        def gen(ids=ids):
            with torch.inference_mode():
                lengths = {"max_new_tokens": OUTPUT_LEN, "min_new_tokens": OUTPUT_LEN}
                return model.generate(ids, do_sample=False, use_cache=True, pad_token_id=0, **lengths)

        gen()  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            result = gen()
            times.append(time.perf_counter() - t)
            assert result.shape == (batch, PROMPT_LEN + OUTPUT_LEN)
        out[batch] = batch * OUTPUT_LEN / statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse a written small checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    concurrency = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_small_checkpoint(args.checkpoint or Path(tmp) / "small")
        # Each system runs in a fresh process: torch work from two threads of one process makes
        # libgomp stop spinning (see engine/async_engine.py), which would handicap whichever runs second.
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            1, mp_context=spawn, initializer=torch.set_num_threads, initargs=(args.threads,)
        ) as pool:
            hf = pool.submit(bench_transformers, path, [1, 8], args.repeats).result()
        with ProcessPoolExecutor(
            1, mp_context=spawn, initializer=torch.set_num_threads, initargs=(args.threads,)
        ) as pool:
            ours = pool.submit(run_engine_bench, path, concurrency, args.repeats).result()
    print(f"# engine benchmark: small Mixtral, bf16, torch {torch.__version__}, {args.threads} threads")
    print(f"# {PROMPT_LEN}-token prompts, exactly {OUTPUT_LEN} output tokens, median of {args.repeats} runs")
    print("\n| system | clients | output tok/s | vs HF b1 | TTFT p50/p99 ms | inter-token p50/p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    base = hf[1]
    for batch, tps in hf.items():
        print(f"| transformers generate | batch {batch} | {tps:.1f} | {tps / base:.2f}x | | |")
    for s in ours:
        print(
            f"| mixtral-server engine | {s.clients} | {s.tok_per_s:.1f} | {s.tok_per_s / base:.2f}x | "
            f"{pct(s.ttft_ms, 0.5):.1f} / {pct(s.ttft_ms, 0.99):.1f} | "
            f"{pct(s.itl_ms, 0.5):.1f} / {pct(s.itl_ms, 0.99):.1f} |"
        )


if __name__ == "__main__":
    main()
