"""Our GEMM (the native CPU step's, `model.native`) against oneDNN's at decode shapes, in one run.

    python -m bench.gemv_probe                  # needs g++ and a CPU with AVX512-BF16

Times `model.native.linear.NativeLinear` (AVX512-BF16 dot products over weights packed in
16-row blocks; the GEMM the native decode step and the CPU prefill run) against oneDNN's
prepacked `_linear_pointwise`, the torch step's CPU GEMM, on the small checkpoint's decode
matrices: 8 layers' qkv, o and two experts' w13 and w2 (61 MB, twice the 32 MB L3 here), each
read once per pass, as a decode step reads them; then three LM-head-sized matrices, large ones.
Rounds alternate the two; printed are the medians, the bandwidth each reaches, and a 1 GiB sum's
read bandwidth. Both results are checked against an fp32 reference first. Each call here is its
own parallel region, as oneDNN's are; inside the native step a whole layer is one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bench.profile_step import read_bandwidth
from model.native.build import load_native
from model.native.linear import NativeLinear
from model.torch_backend.packed import pack_weight, packed_linear

# qkv, o, then two experts' w13 and w2, per layer of the small checkpoint (hidden 512, ffn 1024).
LAYER = [(768, 512), (512, 512), (2048, 512), (512, 1024), (2048, 512), (512, 1024)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2,4,8,16,32")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(2)
    lib = load_native()
    if isinstance(lib, str):
        raise SystemExit(f"no native library here: {lib}")
    natives: dict[int, NativeLinear] = {}  # by id of the plain weight, packed once

    def ours(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if id(w) not in natives:
            natives[id(w)] = NativeLinear(w, lib, threads=2)
        return natives[id(w)](x)

    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, k, generator=g) / 20).bfloat16() for n, k in LAYER * 8]
    packed = [pack_weight(w) for w in weights]
    total = sum(w.numel() * 2 for w in weights)
    print(f"# bf16 GEMM probe: {total / 1e6:.0f} MB of decode weights, torch {torch.__version__}, 2 threads")
    print(f"# read bandwidth (1 GiB sum): {read_bandwidth() / 1e9:.1f} GB/s\n")
    print(
        "| rows | ours ms | GB/s | oneDNN packed ms | GB/s | oneDNN / ours |\n|---:|---:|---:|---:|---:|---:|"
    )
    for m in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(m, k, generator=g).bfloat16() for k in (512, 1024)}
        for w, pw in zip(weights[:4], packed[:4], strict=True):
            x = xs[w.shape[1]]
            want = x.float() @ w.float().T
            err_ours = (ours(x, w).float() - want).abs().max().item()
            err_dnnl = (packed_linear(x, pw).float() - want).abs().max().item()
            assert err_ours <= 1.5 * err_dnnl + 1e-3, (m, err_ours, err_dnnl)

        def run_ours(xs: dict[int, torch.Tensor] = xs) -> None:
            for w in weights:
                ours(xs[w.shape[1]], w)

        def run_onednn(xs: dict[int, torch.Tensor] = xs) -> None:
            for w, pw in zip(weights, packed, strict=True):
                packed_linear(xs[w.shape[1]], pw)

        times: dict[str, list[float]] = {"ours": [], "onednn": []}
        for _ in range(args.rounds):
            for name, fn in (("ours", run_ours), ("onednn", run_onednn)):
                fn()
                start = time.perf_counter()
                for _ in range(10):
                    fn()
                times[name].append((time.perf_counter() - start) / 10)
        o, d = statistics.median(times["ours"]), statistics.median(times["onednn"])
        row = f"| {m} | {o * 1e3:.2f} | {total / o / 1e9:.1f} | {d * 1e3:.2f} | {total / d / 1e9:.1f} |"
        print(f"{row} {d / o:.2f}x |")
    # LM-head-sized matrices (33 MB each), three in turn so that the 32 MB L3 holds none of them.
    heads = [(torch.randn(32000, 512, generator=g) / 20).bfloat16() for _ in range(3)]
    heads_packed, x = [pack_weight(h) for h in heads], torch.randn(1, 512, generator=g).bfloat16()
    o = statistics.median(_seconds(lambda: [ours(x, h) for h in heads]) for _ in range(args.rounds))
    d = statistics.median(
        _seconds(lambda: [packed_linear(x, h) for h in heads_packed]) for _ in range(args.rounds)
    )
    nbytes = sum(h.numel() * 2 for h in heads)
    print(
        f"\nThree 33 MB matrices (LM-head size), 1 row: ours {nbytes / o / 1e9:.1f} GB/s, "
        f"oneDNN {nbytes / d / 1e9:.1f} GB/s"
    )


def _seconds(fn: Callable[[], object], repeats: int = 10) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


if __name__ == "__main__":
    main()
