"""A real server process (`python -m server`) on 127.0.0.1 serving the tiny fp32 Mixtral."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.checkpoints import TinyShape, hf_mixtral, write_hf_mixtral

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-123"
MODEL = "tiny-mixtral"
ALIASES = ("open-mixtral-8x7b", "mistral-small")


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_dir: Path,
    log: Path,
    *extra: str,
    api_key: bool = True,
    timeout: float = 90,
    module: str = "server",
    env: dict[str, str] | None = None,
    until: str = "/ready",
) -> RunningServer:
    """`python -m server` (or another entry point, `module`) serving `model_dir` on 127.0.0.1, once
    `until` answers 200 (`/health`: as soon as it listens; `/ready`: once it serves)."""
    args = [
        "--model", str(model_dir), "--dtype", "float32", "--served-model-name", MODEL, *ALIASES,
        "--max-model-len", "512", "--kv-cache-memory-gb", "0.05", "--max-num-seqs", "16", *extra,
    ]  # fmt: skip
    if api_key:
        args += ["--api-key", API_KEY]
    return launch(args, log, timeout=timeout, module=module, env=env, until=until)


def launch(
    args: list[str],
    log: Path,
    timeout: float = 90,
    module: str = "server",
    env: dict[str, str] | None = None,
    until: str = "/ready",
) -> RunningServer:
    """`python -m <module> <args>` on a free port of 127.0.0.1, once `until` answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port), *args]
    env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    server = RunningServer(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}{until}", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout}s:\n{log.read_text()[-3000:]}")


def scrape(server: RunningServer) -> dict[str, float]:
    """/metrics as {sample name with its labels, "mixtral:" dropped: value}."""
    r = httpx.get(f"{server.url}/metrics", headers=server.headers(), timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key.removeprefix("mixtral:")] = float(value)
    return samples


def stop_server(server: RunningServer) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(15)
        except subprocess.TimeoutExpired:
            server.process.kill()


@pytest.fixture(scope="session")
def long_dir(tmp_path_factory):
    """The tiny checkpoint with a 4,096-token context, for requests that must outlive others."""
    shape = TinyShape(max_position_embeddings=4096)
    return write_hf_mixtral(hf_mixtral(shape), shape, tmp_path_factory.mktemp("long-context"))


@pytest.fixture(scope="session")
def server(hf_dir, tmp_path_factory):
    running = start_server(hf_dir, tmp_path_factory.mktemp("server") / "server.log")
    yield running
    stop_server(running)
