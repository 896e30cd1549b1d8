"""The native CPU decode step against the torch step it replaces, in one process, interleaved.

    python -m bench.native_step                                 # small checkpoint: bf16, int8
    python -m bench.native_step --checkpoint DIR --dtype float32 --quant none   # e.g. the demo

Two engines on the same checkpoint: one with `kernels=torch` (the eager step on oneDNN-prepacked
weights), one with `kernels=native`. Each holds `batch` requests with `bench.engine`'s 64-token prompts,
prefilled, then decoding (`ignore_eos`); rounds alternate between the engines, and each round
times whole engine steps (schedule, forward, LM head, sampling, outputs). Printed per batch:
the median step, the ratio, and, for the native step, the bytes the step must read (its weights
at the step's real routing, and its KV; `bench.gpu_check.step_bytes`) over a 1 GiB sum's read
bandwidth measured in the same run: the ceiling next to ours. Then one request's generation at
batch 1 (64 tokens in, 64 out), tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.engine import PROMPT_LEN, prompts
from bench.profile_step import read_bandwidth, step_read_bytes
from bench.small_checkpoint import write_small_checkpoint
from engine.config import EngineConfig
from engine.llm_engine import Engine
from engine.sampling_params import SamplingParams
from model.loader import load_model
from tokenization.loader import load_prompt_encoder

ENDLESS = SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)  # outlasts the timed steps


def engine(path: Path, dtype: str, quant: str, kernels: str, batch: int) -> Engine:
    config = EngineConfig(
        max_model_len=1024,
        num_kv_blocks=64 * max(batch, 2),
        block_size=16,
        max_num_seqs=max(batch, 1),
        max_num_batched_tokens=2048,
        kernels=kernels,
    )
    model = load_model(path, dtype=dtype, quantization=None if quant == "none" else quant)
    return Engine(model, config, load_prompt_encoder(path), eos_token_id=-1)


def decoding(e: Engine, batch: int) -> Engine:
    """`e` with `batch` requests past their prefill: every further step is decodes only."""
    for i, p in enumerate(prompts(batch, seed=0)):
        e.add_request(f"r{i}", p, ENDLESS)
    for _ in range(4):
        e.step()
    return e


def median_step_ms(e: Engine, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        e.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def generate_tok_s(e: Engine, seed: int) -> float:
    e.add_request(
        f"g{seed}", prompts(1, seed)[0], SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    )
    start = time.perf_counter()
    produced = 0
    while e.has_work:
        produced += sum(len(o.new_token_ids) for o in e.step())
    return produced / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="default: the small random Mixtral (written once)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quant", default="none,int8", help="comma-separated: none and/or int8")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=15, help="steps timed per round")
    args = p.parse_args()
    torch.set_num_threads(2)
    path = args.checkpoint or write_small_checkpoint(Path(tempfile.gettempdir()) / "mixtral-small-ckpt")
    print(f"# native vs torch CPU decode step: {path.name}, {args.dtype}, torch {torch.__version__}")
    print(f"# 2 threads, {PROMPT_LEN}-token prompts; {args.rounds} interleaved rounds of {args.steps} steps")
    bandwidth = read_bandwidth()
    print(f"# read bandwidth (1 GiB sum): {bandwidth / 1e9:.1f} GB/s\n")
    print(
        "| weights | batch | torch step ms | native step ms | torch / native | bytes | ceiling ms | of it |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    generation: list[str] = []
    for quant in args.quant.split(","):
        label = args.dtype if quant == "none" else f"{quant} ({args.dtype} activations)"
        for batch in (int(b) for b in args.batches.split(",")):
            pair = {
                k: decoding(engine(path, args.dtype, quant, k, batch), batch) for k in ("torch", "native")
            }
            assert pair["native"].runner.forward.native is not None, "the native step did not build here"
            times: dict[str, list[float]] = {k: [] for k in pair}
            for r in range(args.rounds):
                for k in pair if r % 2 == 0 else reversed(pair):
                    times[k].append(median_step_ms(pair[k], args.steps))
            t, n = (statistics.median(times[k]) for k in ("torch", "native"))
            row = f"| {label} | {batch} | {t:.2f} | {n:.2f} | {t / n:.2f}x |"
            if pair["native"].runner.model.config.moe is None:
                row += " | | |"  # gpu_check's byte count follows a router (MoE checkpoints only)
            else:
                nbytes = step_read_bytes(pair["native"], 1 if quant == "int8" else 2)
                ceiling = nbytes / bandwidth * 1e3
                row += f" {nbytes / 1e6:.1f} MB | {ceiling:.2f} | {ceiling / n:.0%} |"
            print(row, flush=True)
            if batch == 1:
                fresh = {k: engine(path, args.dtype, quant, k, 1) for k in ("torch", "native")}
                rates: dict[str, list[float]] = {k: [] for k in fresh}
                for r in range(max(3, args.rounds // 2)):
                    for k in fresh if r % 2 == 0 else reversed(fresh):
                        rates[k].append(generate_tok_s(fresh[k], r))
                gt, gn = (statistics.median(rates[k]) for k in ("torch", "native"))
                generation.append(f"| {label} | {gt:.1f} | {gn:.1f} | {gn / gt:.2f}x |")
    print(f"\none request through the engine, {PROMPT_LEN} tokens in, 64 out, tokens/s:\n")
    print("| weights | torch step | native step | native / torch |\n|---|---:|---:|---:|")
    print("\n".join(generation))


if __name__ == "__main__":
    main()
