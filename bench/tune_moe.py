"""Tune the fused MoE kernel's tiles on the GPU at hand; prints rows for model/triton_backend/moe_configs.py.

    python3 bench/tune_moe.py                          # Mixtral 8x7B experts, bf16, M = 1 .. 4096
    python3 bench/tune_moe.py --tokens 1 32 --budget 60
    TRITON_INTERPRET=1 python3 bench/tune_moe.py --smoke   # tiny shapes on CPU (what CI runs)

For each token count M it times the whole fused MoE (both launches) for every candidate tile
config within the time budget, starting from the current table's entry, and prints the fastest
as a row `M: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages),` with its time and the
speedup over the current entry, measured in the same run. Candidates that fail to compile (too
much shared memory, say) are skipped. Routing is random, as in vLLM's tuning script.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from bench.gpu_check import Timer  # noqa: E402
from model.moe import route  # noqa: E402
from model.triton_backend.fused_moe import fused_moe  # noqa: E402
from model.triton_backend.moe_configs import TileConfig, moe_tile_config  # noqa: E402

MIXTRAL = (8, 4096, 14336, 2)  # experts, hidden, expert FFN, top-k
SMOKE = (8, 64, 96, 2)
TOKENS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096)


def candidates(smoke: bool) -> list[TileConfig]:
    if smoke:
        return [TileConfig(16, 32, 32, 1, 4, 2), TileConfig(32, 64, 64, 1, 4, 2)]
    space = itertools.product(
        (16, 32, 64, 128), (32, 64, 128, 256), (64, 128, 256), (1, 16, 64), (4, 8), (2, 3, 4, 5)
    )
    return [TileConfig(*c) for c in space]


def tune(
    run: Callable[[TileConfig], torch.Tensor],
    current: TileConfig,
    pool: list[TileConfig],
    timer: Timer,
    repeats: int,
    budget: float,
) -> tuple[TileConfig, float, float, int, int]:
    """(fastest config, its seconds, the current entry's seconds, candidates timed, pool size)."""
    ref = run(current)
    t_current = timer(lambda: run(current), repeats)
    best, t_best, tried = current, t_current, 0
    random.Random(0).shuffle(pool)
    deadline = time.monotonic() + budget
    for cfg in pool:
        if time.monotonic() > deadline:
            break
        try:
            out = run(cfg)
            t = timer(lambda cfg=cfg: run(cfg), repeats)
        except Exception as exc:  # noqa: BLE001 - out of resources etc.: not a candidate on this card
            print(f"#   {cfg} failed: {type(exc).__name__}", file=sys.stderr)
            continue
        if not torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
            print(f"#   {cfg} gives a different result; skipped", file=sys.stderr)
            continue
        tried += 1
        if t < t_best:
            best, t_best = cfg, t
    return best, t_best, t_current, tried, len(pool)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    ap.add_argument("--budget", type=float, default=30.0, help="seconds of search per token count")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    experts, hidden, ffn, top_k = SMOKE if args.smoke else MIXTRAL
    dtype = torch.float32 if args.smoke else torch.bfloat16  # the interpreter's bf16 dot is wrong
    upcast = args.smoke
    w13 = torch.randn(experts, 2 * ffn, hidden, device=device, dtype=dtype) * 0.02
    w2 = torch.randn(experts, hidden, ffn, device=device, dtype=dtype) * 0.02
    timer = Timer(device)
    repeats = 1 if args.smoke else 20
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"# {name}: E={experts}, N={ffn}, {dtype}; fastest config per token count")
    for m in args.tokens if not args.smoke else [4]:
        x = torch.randn(m, hidden, device=device, dtype=dtype)
        routing = route(torch.randn(m, experts, device=device), top_k)

        def run(cfg: TileConfig, x=x, routing=routing) -> torch.Tensor:
            return fused_moe(x, routing, w13, w2, config=cfg, upcast=upcast)

        current = moe_tile_config(experts, ffn, m, device)
        best, t_best, t_current, tried, pool = tune(
            run, current, candidates(args.smoke), timer, repeats, args.budget
        )
        row = (best.block_m, best.block_n, best.block_k, best.group_m, best.num_warps, best.num_stages)
        print(
            f"    {m}: {row},  # {t_best * 1e6:.0f} us, {t_current / t_best:.2f}x the current entry "
            f"({tried} of {pool} tried)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
