"""Where one engine step's time goes, at a given decode batch size (small checkpoint, bf16, CPU).

    python -m bench.profile_step --batch 1

Prints the wall time per step split into scheduler, batch building, model forward, logits,
sampling and post-processing; then the step against its memory ceiling: the bytes it must read
(attention and router weights, the experts its tokens were routed to, the LM head, the KV of
its contexts; `bench.gpu_check.step_bytes`) over two bandwidths measured here: a 1 GiB copy
(read + write counted) and a 1 GiB sum (read only, the ceiling for streaming weights); then
the torch operators that take the most CPU time.
"""

from __future__ import annotations

import argparse
import collections
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import profile

from bench.small_checkpoint import write_small_checkpoint
from engine.config import EngineConfig
from engine.llm_engine import Engine
from engine.sampling_params import SamplingParams
from model.loader import load_model
from tokenization.loader import load_prompt_encoder

PHASES = {
    "scheduler.schedule": ("scheduler", "schedule"),
    "scheduler.update": ("scheduler", "update"),
    "batch build": ("builder", "build"),
    "model forward": ("model", "forward"),
    "logits (lm_head)": ("model", "compute_logits"),
    "sampler": ("runner", "sampler"),
    "detokenize + outputs": ("outputs", "process"),
}


def build_engine(path: Path, batch: int) -> Engine:
    config = EngineConfig(
        max_model_len=512, num_kv_blocks=batch * 32 + 8, block_size=16, max_num_seqs=max(batch, 1),
        max_num_batched_tokens=max(512, batch * 64), enable_prefix_caching=False,
    )  # fmt: skip
    engine = Engine(load_model(path, dtype="bfloat16"), config, load_prompt_encoder(path), eos_token_id=2)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", [1] + [rng.randrange(100, 31000) for _ in range(63)], params)
    for _ in range(6):  # the prefill, then a few decode steps to warm up
        engine.step()
    return engine


def time_phases(engine: Engine, steps: int) -> tuple[float, dict[str, float]]:
    owners = {
        "scheduler": engine.scheduler, "builder": engine.runner.forward.builder, "model": engine.runner.model,
        "runner": engine.runner, "outputs": engine.output_processor,
    }  # fmt: skip
    spent: dict[str, float] = collections.defaultdict(float)
    for label, (owner, name) in PHASES.items():
        obj = owners[owner]
        original = getattr(obj, name)

        def timed(*args, _f=original, _label=label, **kwargs):
            t = time.perf_counter()
            result = _f(*args, **kwargs)
            spent[_label] += time.perf_counter() - t
            return result

        setattr(obj, name, timed)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - start) / steps, {k: v / steps for k, v in spent.items()}


def copy_bandwidth(repeats: int = 5) -> float:
    """Bytes per second moved by a 1 GiB CPU copy (read + write), the best of `repeats`."""
    src = torch.ones(1 << 30, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _best_seconds(lambda: dst.copy_(src), repeats)


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes per second read by summing 1 GiB of fp32 on the CPU (read only), the best of `repeats`:
    the ceiling for a step that streams its weights once."""
    src = torch.ones(1 << 28, dtype=torch.float32)
    return 4 * src.numel() / _best_seconds(src.sum, repeats)


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def step_read_bytes(engine: Engine, bytes_per_weight: float = 2) -> int:
    """What the next decode step must read: its chunks, captured, then measured by gpu_check's rule
    (`bytes_per_weight`: 1 where every linear layer is int8)."""
    from bench.gpu_check import step_bytes  # its model-only helpers (it imports triton, present here)

    forward = engine.runner.forward
    captured = []

    def capture(chunks, prompt_rows, sample_rows):  # type: ignore[no-untyped-def]
        captured.append(list(chunks))
        return forward(chunks, prompt_rows, sample_rows)

    engine.runner.forward = capture
    engine.step()
    engine.runner.forward = forward
    chunks = captured[0]
    batch = forward.builder.build(chunks)
    kv_tokens = sum(c.num_computed + len(c.token_ids) for c in chunks)
    with torch.inference_mode():  # recomputes the same tokens: the same KV is written again
        model = engine.runner.model
        return step_bytes(
            model,
            batch.input_ids,
            forward.kv_cache,
            batch.attn,
            kv_tokens,
            bytes_per_weight,
            bytes_per_weight,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(write_small_checkpoint(Path(tmp) / "small"), args.batch)
        with profile() as prof:
            for _ in range(10):
                engine.step()
        nbytes = step_read_bytes(engine)
        step, phases = time_phases(engine, args.steps)
        bandwidth, read = copy_bandwidth(), read_bandwidth()
    print(f"# decode step at batch {args.batch}: {step * 1e3:.2f} ms ({args.batch / step:.0f} tok/s)")
    print("\n| phase | ms per step |\n|---|---:|")
    for label, seconds in phases.items():
        print(f"| {label} | {seconds * 1e3:.2f} |")
    print(f"| (rest: Python between phases) | {(step - sum(phases.values())) * 1e3:.2f} |")
    ceiling, read_ceiling = nbytes / bandwidth, nbytes / read
    print(
        "\n| batch | bytes a step reads | copy bandwidth | ceiling step | read bandwidth | ceiling step "
        "| measured step | of the ceilings |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.batch} | {nbytes / 1e6:.1f} MB | {bandwidth / 1e9:.1f} GB/s | {ceiling * 1e3:.2f} ms | "
        f"{read / 1e9:.1f} GB/s | {read_ceiling * 1e3:.2f} ms | {step * 1e3:.2f} ms | "
        f"{ceiling / step:.0%}, {read_ceiling / step:.0%} |"
    )
    print("\nTop operators (torch profiler, 10 steps; profiler overhead inflates small ops):\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
