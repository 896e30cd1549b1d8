"""The deployment files: compose validates; the Dockerfile keeps its promises."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="apt-get install docker-compose")
def test_compose_file_validates():
    env = os.environ | {"MODEL_DIR": "/models/mixtral"}
    done = subprocess.run(
        ["docker-compose", "config", "-q"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    missing = os.environ.copy()
    missing.pop("MODEL_DIR", None)
    done = subprocess.run(
        ["docker-compose", "config", "-q"], cwd=ROOT, env=missing, capture_output=True, text=True
    )
    assert done.returncode != 0 and "MODEL_DIR" in done.stderr  # the weights volume is required


def test_dockerfile_runs_as_non_root_with_healthcheck_and_no_weights():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=" in text and "ARG TORCH_SPEC" in text
    assert "\nUSER app\n" in text and "HEALTHCHECK" in text and "STOPSIGNAL SIGTERM" in text
    assert "MIXTRAL_HOST=0.0.0.0" in text
    assert ".safetensors" not in text and "COPY models" not in text


def test_cpu_image_has_the_compiler_the_native_decode_step_needs():
    """The CPU images (compose's demo, the smoke test) install g++ for `model/native`; the GPU
    image need not (the native step is CPU only)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG CPU_TOOLCHAIN=0" in dockerfile and "install -y -qq --no-install-recommends g++" in dockerfile
    assert 'CPU_TOOLCHAIN: "1"' in (ROOT / "docker-compose.yml").read_text()
    assert "--build-arg CPU_TOOLCHAIN=1" in (ROOT / "deploy" / "smoke.sh").read_text()
