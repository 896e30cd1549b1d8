"""The native CPU decode step against the torch step it replaces, in one process, interleaved.

    python -m bench.native_step                                # small checkpoint, bf16 and int8
    python -m bench.native_step --checkpoint DIR --dtype float32 --quant none   # e.g. the demo

Two copies of the model: one on the torch step (oneDNN-prepacked weights, `kernels=torch`), one
on the native step (`kernels=native`). Rounds alternate between them. Reported per batch size:
the decode step with its LM head (ms, median of the rounds' medians) at 64 tokens of context,
then one request's greedy generation through the engine (prompt of 64 tokens, exactly 64 out,
tokens/s), and the ratios torch / native.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.small_checkpoint import write_small_checkpoint
from engine.config import EngineConfig
from engine.llm_engine import Engine
from engine.sampling_params import SamplingParams
from model.loader import load_model
from tokenization.loader import load_prompt_encoder

CONTEXT = 64


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def engines(path: Path, dtype: str, quant: str, batch: int) -> dict[str, Engine]:
    config = {
        "max_model_len": 256,
        "num_kv_blocks": 16 * max(batch, 2) + 16,
        "block_size": 16,
        "max_num_seqs": max(batch, 1),
        "max_num_batched_tokens": 2048,
    }
    encoder = load_prompt_encoder(path)
    built = {}
    for kernels in ("torch", "native"):
        model = load_model(path, dtype=dtype, quantization=None if quant == "none" else quant)
        built[kernels] = Engine(model, EngineConfig(**config, kernels=kernels), encoder, eos_token_id=-1)
    assert built["native"].runner.forward.native is not None, "the native step did not build here"
    return built


def step_fn(engine: Engine, batch: int) -> Callable[[], object]:
    """One decode step of `batch` sequences at CONTEXT tokens, through the engine's forward."""
    from model.batch import SequenceChunk

    blocks = -(-(CONTEXT + 1) // 16)
    chunks = [SequenceChunk([5], CONTEXT, list(range(i * blocks, (i + 1) * blocks))) for i in range(batch)]
    rows = list(range(batch))
    return lambda: engine.runner.forward(chunks, [], rows)


def generate_tok_s(engine: Engine, seed: int) -> float:
    prompt = torch.randint(3, 1000, (CONTEXT,), generator=torch.Generator().manual_seed(seed)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    engine.add_request(f"r{seed}-{id(engine)}", prompt, params)
    start = time.perf_counter()
    produced = 0
    while engine.has_work:
        produced += sum(len(o.new_token_ids) for o in engine.step())
    return produced / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="default: the small random Mixtral (written once)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quant", default="none,int8", help="comma-separated: none and/or int8")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=15, help="steps timed per round")
    args = p.parse_args()
    torch.set_num_threads(2)
    path = args.checkpoint or write_small_checkpoint(Path(tempfile.gettempdir()) / "mixtral-small-ckpt")
    print(f"# native vs torch CPU decode step: {path.name}, {args.dtype}, torch {torch.__version__}")
    print(f"# 2 threads, {CONTEXT} tokens of context; medians of {args.rounds} interleaved rounds\n")
    print("| weights | batch | torch step ms | native step ms | torch / native |")
    print("|---|---:|---:|---:|---:|")
    generation: list[str] = []
    for quant in args.quant.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            built = engines(path, args.dtype, quant, batch)
            fns = {k: step_fn(e, batch) for k, e in built.items()}
            times: dict[str, list[float]] = {k: [] for k in built}
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    times[k].append(median_ms(fn, args.reps))
            t, n = (statistics.median(times[k]) for k in ("torch", "native"))
            label = args.dtype if quant == "none" else f"{quant} ({args.dtype} activations)"
            print(f"| {label} | {batch} | {t:.2f} | {n:.2f} | {t / n:.2f}x |", flush=True)
            if batch == 1:
                rates: dict[str, list[float]] = {k: [] for k in built}
                for r in range(max(3, args.rounds // 2)):
                    for k, e in built.items():
                        rates[k].append(generate_tok_s(e, r))
                gt, gn = (statistics.median(rates[k]) for k in ("torch", "native"))
                generation.append(f"| {label} | {gt:.1f} | {gn:.1f} | {gn / gt:.2f}x |")
    print("\none request through the engine, 64 tokens out, tokens/s:\n")
    print("| weights | torch step | native step | native / torch |\n|---|---:|---:|---:|")
    print("\n".join(generation))


if __name__ == "__main__":
    main()
