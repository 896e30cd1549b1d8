"""bench/gpu_check.py and bench/tune_moe.py run end to end: a GPU session must not lose minutes to a typo."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_runs_and_its_checks_pass(tmp_path):
    if torch.cuda.is_available():
        args, env = ["--layers", "1", "--skip-8bit"], dict(os.environ)  # a real (short) run on the card
    else:
        args, env = ["--smoke"], os.environ | {"TRITON_INTERPRET": "1"}
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args, "--json", str(out)],
        cwd=tmp_path,  # from anywhere: the script finds the repository itself
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["failures"] == []
    assert {"decode_1", "moe"} <= set(figures["bf16"])
    assert figures["tp"]["rank_ffn"] * 2 == (
        96 if not torch.cuda.is_available() else 14336
    )  # half of each expert
    assert "TP=2 logits vs one rank" in done.stdout
    assert "0 check(s) failed" in done.stdout


def test_tuning_script_prints_a_table_row(tmp_path):
    if torch.cuda.is_available():
        args, env = ["--tokens", "8", "--budget", "5"], dict(os.environ)
    else:
        args, env = ["--smoke"], os.environ | {"TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tune_moe.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("    ")]
    assert len(rows) == 1 and "x the current entry" in rows[0]
    block_m, block_n, block_k, *_ = ast.literal_eval(
        rows[0].split(":", 1)[1].split("#")[0].strip().rstrip(",")
    )
    assert block_m in (16, 32, 64, 128) and block_n >= 32 and block_k >= 16
