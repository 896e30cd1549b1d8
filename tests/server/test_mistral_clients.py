"""The `mistralai` SDKs against the real server: the current one in process, 0.4.2 in a subprocess.

The two versions cannot share an environment, so 0.4.2 is installed with `pip install --target`
into `.cache/mistralai-0.4.2` (.ci/run does it; this test does it too when the folder is missing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from mistralai.client import Mistral

from tests.server.conftest import ALIASES, API_KEY, MODEL

ROOT = Path(__file__).resolve().parents[2]
OLD_SDK = ROOT / ".cache" / "mistralai-0.4.2"
INSTALL_OLD = [
    sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(OLD_SDK),
    "mistralai==0.4.2", "orjson>=3.9.10,<3.11",
]  # fmt: skip
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def client(server):
    return Mistral(api_key=API_KEY, server_url=server.url)


def test_current_sdk_complete_stream_and_models(client):
    reply = client.chat.complete(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=10, safe_prompt=True, random_seed=1
    )
    content = reply.choices[0].message.content
    assert isinstance(content, str) and content
    assert reply.usage.prompt_tokens > 0
    events = list(
        client.chat.stream(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=10, safe_prompt=True)
    )
    streamed = "".join(e.data.choices[0].delta.content or "" for e in events if e.data.choices)
    assert streamed == content
    assert events[-1].data.choices[0].finish_reason in ("stop", "length")
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, *ALIASES]


def test_safe_prompt_changes_the_prompt(server):
    def prompt_tokens(safe: bool) -> int:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1, "safe_prompt": safe}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers(), timeout=60)
        return r.json()["usage"]["prompt_tokens"]

    assert prompt_tokens(True) > prompt_tokens(False)


def test_mistralai_042_as_the_prompt_engineering_guide_uses_it(server):
    if not (OLD_SDK / "mistralai" / "client.py").is_file():
        done = subprocess.run(INSTALL_OLD, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"could not install mistralai 0.4.2: {done.stderr[-300:]}")
    env = os.environ | {"PYTHONPATH": str(OLD_SDK)}
    script = Path(__file__).with_name("mistral042_chat.py")
    done = subprocess.run(
        [sys.executable, str(script), server.url, API_KEY, MODEL],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert str(OLD_SDK) in result["version"]  # really the old SDK
    assert result["content_type"] == "str" and result["content"]
    assert result["finish_reason"] in ("stop", "length")
    assert result["streamed"] == result["content"]
    assert MODEL in result["models"]
