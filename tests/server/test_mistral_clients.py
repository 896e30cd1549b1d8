"""The `mistralai` SDKs against the real server: the current one in process, 0.4.2 in a subprocess.

The two versions cannot share an environment, so 0.4.2 is installed with `pip install --target`
into `.cache/mistralai-0.4.2` (.ci/run does it; this test does it too when the folder is missing).
orjson, which 0.4.2 needs, is not in the main environment, so it goes into that folder too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mistralai.client import Mistral, errors

from tests.server.conftest import ALIASES, API_KEY, MODEL

ROOT = Path(__file__).resolve().parents[2]
OLD_SDK = ROOT / ".cache" / "mistralai-0.4.2"
INSTALL_OLD = [
    sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(OLD_SDK),
    "mistralai==0.4.2", "orjson>=3.9.10,<3.11",
]  # fmt: skip
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a fruit."},
]


@pytest.fixture(scope="module")
def client(server):
    return Mistral(api_key=API_KEY, server_url=server.url, timeout_ms=60_000)


def test_complete_with_safe_prompt_and_seed(client):
    reply = client.chat.complete(
        model=MODEL, messages=MESSAGES, temperature=0.8, max_tokens=10, safe_prompt=True, random_seed=7
    )
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 10
    again = client.chat.complete(
        model=MODEL, messages=MESSAGES, temperature=0.8, max_tokens=10, safe_prompt=True, random_seed=7
    )
    assert again.choices[0].message.content == choice.message.content  # same seed, same sample
    plain = client.chat.complete(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert plain.usage.prompt_tokens < reply.usage.prompt_tokens  # the safe prompt was added


def test_stream_equals_complete_at_temperature_zero(client):
    full = client.chat.complete(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12)
    events = list(client.chat.stream(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12))
    chunks = [e.data for e in events]  # every event parsed into the SDK's chunk model
    assert all(c.model == MODEL and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finals) == 1 and finals[0] is chunks[-1]
    assert finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert finals[0].usage.completion_tokens == full.usage.completion_tokens  # Mistral style


def test_models_list_and_retrieve(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL, *ALIASES]
    assert all(m.type == "base" and m.capabilities.completion_chat for m in models)
    assert client.models.retrieve(model_id=ALIASES[0]).id == ALIASES[0]


def test_errors_reach_the_sdk_as_status_codes(client):
    with pytest.raises(errors.SDKError) as err:
        client.chat.complete(model="no-such-model", messages=MESSAGES, max_tokens=1)
    assert err.value.status_code == 404
    with pytest.raises(errors.SDKError) as err:
        client.chat.complete(model=MODEL, messages=MESSAGES, max_tokens=100_000)
    assert err.value.status_code == 400 and "context_length_exceeded" in err.value.body
    bad = Mistral(api_key="wrong", server_url=client.sdk_configuration.server_url)
    with pytest.raises(errors.SDKError) as err:
        bad.models.list()
    assert err.value.status_code == 401


def old_sdk_dir() -> Path:
    """The mistralai 0.4.2 folder, installed now if missing (skip only if that fails)."""
    if not (OLD_SDK / "mistralai" / "client.py").is_file() or not (OLD_SDK / "orjson").is_dir():
        done = subprocess.run(INSTALL_OLD, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.skip(
                f"could not install mistralai 0.4.2 with {' '.join(INSTALL_OLD)}: {done.stderr[-500:]}"
            )
    return OLD_SDK


def test_mistralai_042_as_the_prompt_engineering_guide_uses_it(server):
    sdk = old_sdk_dir()
    path = os.pathsep.join([str(sdk), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("mistral042_chat.py")), server.url, API_KEY, MODEL],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": path},
        cwd=sdk,  # not the repository root: nothing there may shadow the old SDK
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sdk_file"].startswith(str(sdk))  # really the old SDK, not the current one
    assert result["object"] == "chat.completion" and result["model"] == MODEL
    assert result["role"] == "assistant"
    assert result["content_type"] == "str" and result["content"]
    assert result["finish_reason"] in ("stop", "length")
    assert result["completion_tokens"] <= 12
    assert result["prompt_tokens"] > result["prompt_tokens_without_safe_mode"]  # safe_mode arrived
    assert result["first_delta_role"] == "assistant"
    assert result["streamed"] == result["content"]  # temperature 0: stream == non-stream
    assert result["stream_finish_reasons"] == [result["finish_reason"]]
    assert result["stream_usage"] == result["completion_tokens"]
    assert result["models"] == [MODEL, *ALIASES]
    assert result["unknown_model_status"] == 404
