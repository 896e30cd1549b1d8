"""A/B: the engine and the HTTP server of an earlier commit against this tree, back to back.

    python -m bench.ab --base REV                  # 3 rounds, 1 and 32 clients
    python -m bench.ab --base REV --rounds 5 --clients 1,8,32

Both trees serve PERFORMANCE.md's "small" random Mixtral (written once, shared), or the checkpoint
`--checkpoint` names (`python -m model.demo moe` prints the demo-moe's). Each round runs,
in each tree, `bench.engine`'s engine-only run (`AsyncEngine.generate`, 64-token prompts, exactly
64 tokens out) and then `bench.serve`'s HTTP run against that tree's own server (started on the
checkpoint, stopped before the next run, so nothing shares the two cores). The order of the
trees alternates between rounds. Reported: output tokens/s per run, the median over rounds, and
this tree's median as a ratio of the base's. The 1-minute load average before each run is
printed: before the first it shows whether the machine was quiet (about 0); later ones include
the previous run's own two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from bench.serve import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# Run inside a tree (cwd and sys.path[0]): each measures its own code, with its own bench scripts.
ENGINE_RUN = """
import json, sys
from pathlib import Path
import torch
from bench.engine import run_engine_bench
torch.set_num_threads(2)
levels = [int(c) for c in sys.argv[2].split(",")]
print(json.dumps({s.clients: s.tok_per_s for s in run_engine_bench(Path(sys.argv[1]), levels, 1)}))
"""
SERVE_RUN = """
import json, sys
from pathlib import Path
from bench import serve
levels = [int(c) for c in sys.argv[2].split(",")]
opts = serve.parse_args(["--clients", sys.argv[2], "--repeats", "1"])
proc, opts.base_url, _ = serve.start_server(Path(sys.argv[1]), levels, opts, Path(sys.argv[3]))
opts.model = Path(sys.argv[1]).name
try:
    results = serve.bench(opts, levels)
finally:
    serve.stop(proc)
if err := serve.first_error(results):
    raise SystemExit(f"a request failed: {err}")
print(json.dumps({r.clients: r.tok_per_s for r in results}))
"""


def export(rev: str, out: Path) -> Path:
    """The files of `rev` (as committed) in `out`."""
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(out, filter="data")
    return out


def run(tree: Path, code: str, *args: str) -> dict[int, float]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=tree, capture_output=True, text=True, env=os.environ
    )
    if done.returncode != 0:
        raise SystemExit(f"a run in {tree} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the commit to compare with (any git revision)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", default="1,32")
    p.add_argument(
        "--checkpoint", type=Path, help="a checkpoint directory to serve instead (the demo model's, for one)"
    )
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"base": export(args.base, Path(tmp) / "base"), "this": ROOT}
        checkpoint = args.checkpoint or write_checkpoint(Path(tmp) / "small")  # in a child: no torch here
        figures: dict[tuple[str, str], list[dict[int, float]]] = {}
        for round_ in range(1, args.rounds + 1):
            order = ["base", "this"] if round_ % 2 else ["this", "base"]
            for name in order:
                for kind, driver in (("engine", ENGINE_RUN), ("serve", SERVE_RUN)):
                    load = os.getloadavg()[0]
                    log = Path(tmp) / f"{name}-{kind}-{round_}.log"
                    tps = run(trees[name], driver, str(checkpoint), args.clients, str(log))
                    figures.setdefault((name, kind), []).append(tps)
                    each = ", ".join(f"{c} clients {t:.1f} tok/s" for c, t in tps.items())
                    print(f"round {round_} {name:4} {kind:6} (load {load:.2f} before): {each}", flush=True)
    base_rev = subprocess.run(
        ["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True
    )
    print(f"\n# base {base_rev.stdout.strip()} vs this tree: output tok/s, median of {args.rounds} rounds\n")
    print("| run | clients | base | this | this / base |\n|---|---:|---:|---:|---:|")
    for kind in ("engine", "serve"):
        for c in levels:
            base = statistics.median(f[c] for f in figures[("base", kind)])
            this = statistics.median(f[c] for f in figures[("this", kind)])
            print(f"| {kind} | {c} | {base:.1f} | {this:.1f} | {this / base:.2f}x |")


if __name__ == "__main__":
    main()
