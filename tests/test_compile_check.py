"""The GPU path's Triton kernels compile for an H100 (sm_90) here, with no GPU.

`bench.compile_check --quick` drives our real wrappers (fused MoE at three tuned-table rows with
bf16 and fp8 weights, the KV write, decode attention unsplit and split, prefill attention),
records every launch, and compiles each variant for sm_90 with the ptxas Triton bundles. A kernel
that does not compile for Hopper, or needs more shared memory than a block may have there, fails
this test on a machine that has never seen a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_launched_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.compile_check", "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    kernels = {row.split(" | ")[1].split()[0] for row in rows}
    launched = ("_grouped_gemm_kernel", "_write_kv_kernel", "_decode_kernel", "_merge_splits_kernel")
    assert kernels == {*launched, "_prefill_kernel"}
    assert all(row.rstrip(" |").endswith(("ok", "spills")) for row in rows), "\n".join(rows)
    assert f"{len(rows)} of {len(rows)} variants compile and fit" in done.stdout
    assert any("fp8" in row for row in rows) and any("32 split(s)" in row for row in rows)
