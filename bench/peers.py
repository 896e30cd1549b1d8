"""Side by side with llama.cpp's server on this CPU: the same checkpoint, the same streaming load.

    python -m bench.peers                              # builds llama-server first (~12 min, once)
    python -m bench.peers --llama-server PATH          # a llama-server you built
    python -m bench.peers --formats f16,q8_0 --clients 1,8,32
    python -m bench.peers --formats f16,q8_0 --rounds 3   # ratios as medians over alternating rounds

The "small" random Mixtral of PERFORMANCE.md, written once as an HF checkpoint, is converted
with llama.cpp's own `convert_hf_to_gguf.py` (f16 and Q8_0). Then, one server at a time on
127.0.0.1 (never both at once), for each format:
- ours: `python -m server` on the HF checkpoint in bf16 (for Q8_0: `--quantization int8`);
- llama-server: `-np` = the most clients, `-t` = the cores, `-cb`, the context sized for them.
The load is `bench.serve`'s: /v1/completions with the prompt as token ids, exactly
`--prompt-len` tokens in and `--output-len` out (`ignore_eos`), greedy, streamed, at each
concurrency level, median of `--repeats` runs. Printed: each system's table (output tok/s, TTFT
and inter-token p50/p99), then the ratios ours / llama-server. With `--rounds N`, each format's
pair of systems runs N times, alternating which goes first, and the ratios' medians over the
rounds close the report (this machine's speed drifts by +-20% between minutes).

llama-server is built from the llama-cpp-python sdist on PyPI (its vendored llama.cpp, a native
Release build with cmake and the system compiler) under `--peers` (default: peers/ in the temp
directory), as ../shared/tools/setup_peers.sh does. The build stays out of CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench import serve

LLAMA_CPP_PYTHON = "0.3.36"
GGUF_TYPES = {"f16": "f16", "q8_0": "q8_0"}
OUR_FLAGS = {"f16": [], "q8_0": ["--quantization", "int8"]}


def build_llama_server(peers: Path) -> Path:
    """llama-server from the llama-cpp-python sdist's vendored llama.cpp (skipped when built)."""
    binary = peers / "llama.cpp" / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    peers.mkdir(parents=True, exist_ok=True)
    sdist = peers / "sdist"
    print(
        f"# building llama-server from llama-cpp-python {LLAMA_CPP_PYTHON} (about 12 min on 2 cores)",
        flush=True,
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", "-d", str(sdist),
         f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
        check=True,
    )  # fmt: skip
    with tarfile.open(sdist / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
        tar.extractall(peers, filter="data")
    unpacked = peers / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    shutil.rmtree(peers / "llama.cpp", ignore_errors=True)
    (unpacked / "vendor" / "llama.cpp").rename(peers / "llama.cpp")
    shutil.rmtree(unpacked)
    src, build = peers / "llama.cpp", peers / "llama.cpp" / "build"
    subprocess.run(
        ["cmake", "-S", str(src), "-B", str(build), "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         "-DLLAMA_BUILD_TOOLS=ON", "-DCMAKE_BUILD_TYPE=Release"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    jobs = str(len(os.sched_getaffinity(0)))
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], check=True)
    return binary


def convert(checkpoint: Path, llama_cpp: Path, fmt: str, out: Path) -> Path:
    """The checkpoint as GGUF, by llama.cpp's own converter (with its own gguf-py)."""
    gguf = out / f"{checkpoint.name}-{fmt}.gguf"
    if gguf.is_file():
        return gguf
    env = os.environ | {"PYTHONPATH": str(llama_cpp / "gguf-py")}
    cmd = [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(checkpoint)]
    cmd += ["--outtype", GGUF_TYPES[fmt], "--outfile", str(gguf)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")
    return gguf


def start_llama_server(binary: Path, gguf: Path, levels: list[int], opts: argparse.Namespace, log: Path):
    port = serve.free_port()
    slots = max(levels)
    context = slots * (opts.prompt_len + opts.output_len + 16)
    cmd = [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c", str(context),
        "-np", str(slots), "-t", str(len(os.sched_getaffinity(0))), "-cb", "--alias", opts.model,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    serve.wait_until_up(proc, f"{url}/health", log, "llama-server")
    return proc, url, cmd


def run_system(name: str, start, opts: argparse.Namespace, levels: list[int]) -> list[serve.RunResult]:
    proc, opts.base_url, cmd = start()
    opts.server_pid = proc.pid
    try:
        results = serve.bench(opts, levels)
    finally:
        serve.stop(proc)
        opts.server_pid = None
    shown = " ".join(Path(part).name if os.sep in part else part for part in cmd)
    print(f"\n## {name}: {shown}\n", flush=True)
    print("\n".join(serve.table(results, name)), flush=True)
    if err := serve.first_error(results):
        print(f"\nfirst failure: {err}")
        raise SystemExit(f"{name}: a request failed, so no ratio would mean anything: {err}")
    return results


RATIO_COLUMNS = ("output tok/s", "TTFT p50", "TTFT p99", "inter-token p50", "inter-token p99")


def ratio_values(a: serve.RunResult, b: serve.RunResult) -> list[float]:
    """Ours / llama-server at one level: tok/s, then TTFT and inter-token p50 / p99."""
    ttft_a = [s.ttft for s in a.ok if s.ttft is not None]
    ttft_b = [s.ttft for s in b.ok if s.ttft is not None]
    itl_a = [x for s in a.ok for x in s.itl]
    itl_b = [x for s in b.ok for x in s.itl]
    return [
        a.tok_per_s / b.tok_per_s,
        *(
            serve.pct(x, q) / serve.pct(y, q)
            for x, y, q in (
                (ttft_a, ttft_b, 0.5),
                (ttft_a, ttft_b, 0.99),
                (itl_a, itl_b, 0.5),
                (itl_a, itl_b, 0.99),
            )
        ),
    ]


def ratio_table(title: str, rows: dict[int, list[float]]) -> list[str]:
    lines = [
        f"\n## {title}\n",
        "| clients | " + " | ".join(RATIO_COLUMNS) + " |",
        "|---:|" + "---:|" * len(RATIO_COLUMNS),
    ]
    lines += [f"| {c} | " + " | ".join(f"{v:.2f}x" for v in values) + " |" for c, values in rows.items()]
    lines.append("\n(tok/s above 1 is ours faster; latencies below 1 are ours shorter)")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--llama-server", type=Path, help="a llama-server binary (default: build one under --peers)"
    )
    p.add_argument("--peers", type=Path, default=Path(tempfile.gettempdir()) / "peers")
    p.add_argument("--formats", default="f16", help="f16 and/or q8_0 (ours: bf16 / --quantization int8)")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--rounds", type=int, default=1, help="pairs of runs per format, alternating which system goes first"
    )
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--checkpoint", type=Path, help="reuse (or write) the small checkpoint here")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    binary = args.llama_server or build_llama_server(args.peers)
    llama_cpp = binary.resolve().parents[2]  # llama.cpp/build/bin/llama-server
    opts = serve.parse_args(
        [
            "--prompt-len",
            str(args.prompt_len),
            "--output-len",
            str(args.output_len),
            "--repeats",
            str(args.repeats),
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = serve.write_checkpoint(args.checkpoint or work / "small")
        opts.model = checkpoint.name  # the id our server serves it under, and llama-server's alias
        print(
            f"# peers: the small checkpoint, {args.prompt_len}-token prompts, exactly {args.output_len} "
            f"output tokens, streamed, median of {args.repeats} runs; {len(os.sched_getaffinity(0))} cores",
            flush=True,
        )
        report: list[str] = []
        for fmt in args.formats.split(","):
            gguf = convert(checkpoint, llama_cpp, fmt, work)
            opts.server_arg = OUR_FLAGS[fmt]
            systems = {
                "ours": (
                    f"mixtral-server ({'bf16' if fmt == 'f16' else 'int8'})",
                    lambda f=fmt: serve.start_server(checkpoint, levels, opts, work / f"ours-{f}.log"),
                ),
                "peer": (
                    f"llama-server ({fmt})",
                    lambda g=gguf, f=fmt: start_llama_server(
                        binary, g, levels, opts, work / f"llama-{f}.log"
                    ),
                ),
            }
            per_round: list[dict[int, list[float]]] = []
            for r in range(args.rounds):
                order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")  # alternate who goes first
                if args.rounds > 1:
                    print(f"\n# {fmt}, round {r + 1} of {args.rounds}: {' then '.join(order)}", flush=True)
                got = {key: run_system(*systems[key], opts, levels) for key in order}
                per_round.append(
                    {a.clients: ratio_values(a, b) for a, b in zip(got["ours"], got["peer"], strict=True)}
                )
                if args.rounds > 1:
                    print("\n".join(ratio_table(f"ours / llama-server, {fmt}, round {r + 1}", per_round[-1])))
            median = {
                c: [statistics.median(rnd[c][i] for rnd in per_round) for i in range(len(RATIO_COLUMNS))]
                for c in levels
            }
            title = f"ours / llama-server, {fmt}" + (
                f", median of {args.rounds} rounds" if args.rounds > 1 else ""
            )
            report += ratio_table(title, median)
        print("\n".join(report))


if __name__ == "__main__":
    main()
