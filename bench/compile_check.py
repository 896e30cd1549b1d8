"""Compile every Triton kernel variant the GPU path launches, for a GPU that is not here.

    python -m bench.compile_check             # Hopper (sm_90: H100, H200), every variant
    python -m bench.compile_check --quick     # a representative subset (what CI runs)
    python -m bench.compile_check --arch 80   # Ampere (A100): no fp8 there

No GPU needed: Triton compiles to a cubin with the ptxas it bundles. The launches are the real
ones. Our wrappers (`fused_moe`, `paged_attention`, `decode_attention`, `write_kv`) run on small
CPU tensors that specialise the kernels as Mixtral 8x7B's do: the same dtypes, and sizes and
strides that are multiples of 16 as 4096, 14336 and 128 are. Meanwhile a stand-in Triton driver
names the target GPU, and a hook records each launch instead of running it. Each distinct
variant is then compiled for the target. Its resource use is read from the cubin with the
bundled cuobjdump: registers, spilled bytes (local memory) and shared memory.

Variants: the fused MoE at every row of the tuned tables (H100 and H200; one rank's shapes at
TP=1, 2, 4 and EP=2, 4) with bf16, int8 and fp8
(sm_89 and up) weights, both launches; decode attention unsplit and split 2 to 32 ways; prefill
attention; the KV write; bf16 throughout, as the GPU configs serve.

Exit status 1 if a variant fails to compile, or needs more shared memory than a block may have on
the target. Spills are printed but not fatal: they cost speed, not correctness.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from model.backend import Routing  # noqa: E402
from model.batch import BatchBuilder, SequenceChunk  # noqa: E402
from model.quant import WeightQuant, quantize_rows  # noqa: E402
from model.triton_backend import fused_moe, moe_configs, paged_attention  # noqa: E402

# Shared memory one block may use (opt-in maximum), per compute capability major.minor.
MAX_SHARED = {90: 227 * 1024, 89: 99 * 1024, 86: 99 * 1024, 80: 163 * 1024}
EXPERTS, HIDDEN, FFN, TOP_K = 8, 64, 64, 2  # Mixtral: 8, 4096, 14336, 2 (same divisibility by 16)
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16  # Mixtral's attention, as served


class OfflineDriver(DriverBase):
    """A Triton driver for a GPU that is not here: it names the target and launches nothing."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    @classmethod
    def is_active(cls) -> bool:
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("offline: nothing is launched")

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("offline: nothing is launched")

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@dataclass(frozen=True)
class Launch:
    label: str  # what our code was doing
    kernel: triton.runtime.JITFunction
    compile: dict  # what Triton's jit_cache_hook hands over: signature, constants, options


class Recorder:
    """Records the launches our wrappers make (none runs), labelled by what is being launched."""

    def __init__(self) -> None:
        self.launches: dict[str, Launch] = {}  # by Triton's cache key: one per distinct variant
        self.label = ""

    def hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:  # noqa: A002
        self.launches.setdefault(str(key), Launch(self.label, fn.jit_function, compile))
        return True  # skip compiling and launching here


def record_moe(rec: Recorder, arch: int, quick: bool) -> None:
    schemes = [None, WeightQuant.INT8] + ([WeightQuant.FP8] if arch >= 89 else [])
    tables = dict(moe_configs.TUNED)
    if quick:
        tables = {
            (8, 14336, "H100"): {t: tables[8, 14336, "H100"][t] for t in (1, 32, 256)},
            (8, 7168, "H100"): {t: tables[8, 7168, "H100"][t] for t in (1, 4)},  # one TP=2 rank
        }
        schemes = [None, schemes[-1]]
    for scheme in schemes:
        for (experts, ffn, family), table in tables.items():
            # Each rank's layer: E experts (fewer under expert parallel), N = its FFN slice, here
            # scaled down with the same divisibility by 16 as 14336, 7168 and 3584.
            w13 = torch.randn(experts, 2 * FFN, HIDDEN, dtype=torch.bfloat16)
            w2 = torch.randn(experts, HIDDEN, FFN, dtype=torch.bfloat16)
            weights = (w13, None, w2, None)
            if scheme is not None:
                (q13, s13), (q2, s2) = quantize_rows(w13, scheme), quantize_rows(w2, scheme)
                weights = (q13, s13, q2, s2)
            for tokens, row in table.items():
                shape = f"E={experts},N={ffn}"
                rec.label = f"MoE {family} {shape} {tokens:>4} tokens {scheme.value if scheme else 'bf16'}"
                n = min(tokens, 256)
                x = torch.randn(n, HIDDEN, dtype=torch.bfloat16)
                ids = torch.randint(0, experts, (n, TOP_K))
                routing = Routing(ids, torch.full((n, TOP_K), 0.5))
                fused_moe.fused_moe(
                    x, routing, weights[0], weights[2], weights[1], weights[3], moe_configs.TileConfig(*row)
                )


def record_attention(rec: Recorder, quick: bool) -> None:
    cache = torch.zeros(2, 64, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    q = torch.zeros(40, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    rec.label = "KV write"
    k = torch.zeros(40, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    paged_attention.write_kv(cache, k, k, torch.arange(40))
    for splits in (1, 32) if quick else (1, 2, 4, 8, 16, 32):
        rec.label = f"decode attention, {splits} split(s)"
        tables, lens = torch.zeros(16, 32, dtype=torch.int64), torch.full((16,), 300)
        paged_attention.decode_attention(q[:16], cache, tables, lens, 0.1, num_splits=splits)
    # Block tables as wide as the runner makes them for Mixtral's 32k context (2,048 blocks).
    builder = BatchBuilder(64, 16, 32768 // BLOCK, BLOCK, torch.device("cpu"))
    rec.label = "prefill attention (+ 8 decodes)"
    chunks = [SequenceChunk([7], 20, [0, 1])] * 8 + [SequenceChunk([7] * 32, 16, [2, 3, 4])]
    paged_attention.paged_attention(q, cache, builder.build(chunks).attn, 0.1)
    rec.label = "prefill attention"
    meta = builder.build([SequenceChunk([7] * 32, 16, [2, 3, 4])]).attn
    paged_attention.paged_attention(q[:32], cache, meta, 0.1)


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL, ... of the kernel in a cubin, from the cuobjdump Triton bundles."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    return {k: int(v) for k, v in re.findall(r"(\w+)(?:\[\d+\])?:(\d+)", out.split("Resource usage:")[-1])}


def compile_for(launch: Launch, target: GPUTarget):
    c = launch.compile
    src = ASTSource(launch.kernel, c["signature"], c["constants"], c["configs"][0])
    options = {k: c[k] for k in ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")}
    return triton.compile(src, target=target, options=options)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED), help="compute capability")
    ap.add_argument("--quick", action="store_true", help="a representative subset")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    rec = Recorder()
    saved_driver, saved_hook = driver._active, knobs.runtime.jit_cache_hook
    driver.set_active(OfflineDriver(target))
    knobs.runtime.jit_cache_hook = rec.hook
    real_sms, real_block_m = paged_attention.sm_count, paged_attention.prefill_block_m
    paged_attention.sm_count = lambda device: 132  # what the kernels see on an H100
    paged_attention.prefill_block_m = lambda device: 64
    try:
        record_moe(rec, args.arch, args.quick)
        record_attention(rec, args.quick)
    finally:
        driver._active, knobs.runtime.jit_cache_hook = saved_driver, saved_hook
        paged_attention.sm_count, paged_attention.prefill_block_m = real_sms, real_block_m
        for launch in rec.launches.values():  # their per-device caches hold the stand-in target
            launch.kernel.device_caches.clear()

    limit = MAX_SHARED[args.arch]
    print(f"# Triton {triton.__version__}, target sm_{args.arch} (shared memory per block <= {limit} B)")
    print(f"# {len(rec.launches)} distinct kernel variants launched by our wrappers")
    print("| launch | kernel | warps | stages | registers | spilled B | shared B | compile s | |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    failed = 0
    for launch in rec.launches.values():
        c = launch.compile
        name = launch.kernel.fn.__name__
        consts = {launch.kernel.arg_names[i[0]]: v for i, v in c["constants"].items()}
        tiles = ",".join(f"{k[6:]}={v}" for k, v in consts.items() if k.startswith("BLOCK_"))
        if "GATED" in consts:
            name += " gate/up" if consts["GATED"] else " down"
        started = time.monotonic()
        try:
            kernel = compile_for(launch, target)
        except Exception as exc:  # report every failure, not just the first
            failed += 1
            print(f"| {launch.label} | {name} {tiles} | | | | | | | FAILED: {str(exc)[:300]} |", flush=True)
            continue
        seconds = time.monotonic() - started
        res = cubin_resources(kernel.asm["cubin"])
        shared = kernel.metadata.shared
        spilled = res.get("LOCAL", 0) + res.get("STACK", 0)
        verdict = "too much shared memory" if shared > limit else ("spills" if spilled else "ok")
        failed += shared > limit
        regs = res.get("REG", 0)
        cells = f"{c['num_warps']} | {c['num_stages']} | {regs} | {spilled} | {shared} | {seconds:.1f}"
        print(f"| {launch.label} | {name} {tiles} | {cells} | {verdict} |", flush=True)
    print(f"# {len(rec.launches) - failed} of {len(rec.launches)} variants compile and fit")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
