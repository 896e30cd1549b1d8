"""MoE layer benchmark: our grouped dispatch against transformers' per-expert loop, same weights, one run.

    python bench/moe.py                     # small and Mixtral expert shapes, bf16, 2 threads
    python bench/moe.py --shapes small --dtype float32

For each token count it checks that all give the same output, then times each (one warm-up,
median of repeats) and prints milliseconds, achieved GFLOP/s (expert GEMMs + router) and the
ratios. The baseline is `MixtralSparseMoeBlock` with `experts_implementation="eager"`: the loop
over experts. "ours" is our grouped dispatch on plain weights; "packed" is the same with the
oneDNN-prepacked weights the engine uses on CPU (`FeedForward.pack_for_cpu`).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.moe import FeedForward


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    ffn: int
    experts: int
    top_k: int
    tokens: tuple[int, ...]


SHAPES = {
    "small": Shape("small (PERFORMANCE.md)", 512, 1024, 8, 2, (1, 8, 32, 64, 512)),
    "mixtral": Shape("Mixtral 8x7B expert", 4096, 14336, 8, 2, (1, 8, 32, 128)),
}


def build_packed(ours: FeedForward, shape: Shape) -> FeedForward:
    """A prepacked copy of `ours` (packing drops the dense weights, so it needs its own)."""
    packed = FeedForward(shape.hidden, shape.ffn, shape.experts, shape.top_k).to(ours.w13.dtype)
    with torch.no_grad():
        packed.w13.copy_(ours.w13)
        packed.w2.copy_(ours.w2)
        packed.gate.weight.copy_(ours.gate.weight)
    packed.pack_for_cpu()
    return packed.eval()


def build_pair(shape: Shape, dtype: torch.dtype) -> tuple[torch.nn.Module, FeedForward]:
    """transformers' block with random weights, and ours sharing the very same tensors."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_local_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
    )
    cfg._experts_implementation = "eager"
    with torch.device("meta"):
        hf = MixtralSparseMoeBlock(cfg)
        ours = FeedForward(shape.hidden, shape.ffn, shape.experts, shape.top_k)
    hf = hf.to_empty(device="cpu").to(dtype).eval()
    std = shape.hidden**-0.5
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, std)
    ours.w13 = hf.experts.gate_up_proj  # [E, 2F, D], gate first: the same layout
    ours.w2 = hf.experts.down_proj  # [E, D, F]
    ours.gate = torch.nn.Linear(shape.hidden, shape.experts, bias=False, device="meta")
    ours.gate.weight = hf.gate.weight
    return hf, ours.eval()


def timed(fn: Callable[[], torch.Tensor], min_seconds: float, max_reps: int) -> float:
    """Median seconds per call after one warm-up; at least 3 repeats."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops(shape: Shape, tokens: int) -> float:
    pairs = tokens * shape.top_k
    return 2.0 * pairs * 3 * shape.hidden * shape.ffn + 2.0 * tokens * shape.hidden * shape.experts


def run_shape(shape: Shape, dtype: torch.dtype, min_seconds: float) -> None:
    hf, ours = build_pair(shape, dtype)
    packed = build_packed(ours, shape)
    experts = f"{shape.experts} experts, top-{shape.top_k}"
    print(f"\n## {shape.name}: hidden {shape.hidden}, ffn {shape.ffn}, {experts}")
    header = (
        "| tokens | HF ms | ours ms | packed ms | ours vs HF | packed vs HF | GFLOP/s HF/ours/packed | diff |"
    )
    print(header)
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in shape.tokens:
        x = torch.randn(n, shape.hidden, dtype=dtype)
        with torch.inference_mode():
            ref = hf(x[None])[0].float()
            diff = max((m(x).float() - ref).abs().max().item() for m in (ours, packed))
            t_hf = timed(lambda x=x: hf(x[None]), min_seconds, 50)
            t_ours = timed(lambda x=x: ours(x), min_seconds, 50)
            t_packed = timed(lambda x=x: packed(x), min_seconds, 50)
        gflops = " / ".join(f"{flops(shape, n) / t / 1e9:.0f}" for t in (t_hf, t_ours, t_packed))
        print(
            f"| {n} | {t_hf * 1e3:.2f} | {t_ours * 1e3:.2f} | {t_packed * 1e3:.2f} | {t_hf / t_ours:.2f}x | "
            f"{t_hf / t_packed:.2f}x | {gflops} | {diff:.1e} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,mixtral", help="comma-separated: " + ",".join(SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time budget per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"# MoE layer benchmark: torch {torch.__version__}, {args.threads} threads, {args.dtype}, "
        f"{platform.processor() or platform.machine()}"
    )
    for name in args.shapes.split(","):
        run_shape(SHAPES[name], getattr(torch, args.dtype), args.min_seconds)


if __name__ == "__main__":
    main()
