"""bench/gpu_check.py runs end to end at tiny shapes, so a GPU session does not lose its minutes to a typo."""

from __future__ import annotations

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
    assert "0 check(s) failed" in done.stdout
