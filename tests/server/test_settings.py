"""Settings precedence: defaults < YAML file < MIXTRAL_* environment < command-line flags."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.config import EngineArgs
from server.cli import parse_args
from server.settings import ServerSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_bind_loopback():
    s = load_settings({})
    assert s.host == "127.0.0.1" and s.port == 8000 and s.api_keys == []


def test_yaml_then_env_then_flags(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 9001\nmax-num-seqs: 7\nserved_model_name: [a, b]\ndtype: float16\n")
    assert load_settings({}, cfg).port == 9001
    monkeypatch.setenv("MIXTRAL_PORT", "9002")
    monkeypatch.setenv("MIXTRAL_DTYPE", "bfloat16")
    s = load_settings({}, cfg)
    assert (s.port, s.max_num_seqs, s.served_model_name, s.dtype) == (9002, 7, ["a", "b"], "bfloat16")
    flags, config = parse_args(["--port", "9003", "--config", str(cfg), "--api-key", "k1", "--api-key", "k2"])
    s = load_settings(flags, config)
    assert (s.port, s.max_num_seqs, s.api_keys) == (9003, 7, ["k1", "k2"])


def test_unknown_yaml_key_is_an_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_num_seq: 3\n")  # typo
    with pytest.raises(ValidationError, match="max_num_seq"):
        load_settings({}, cfg)


def test_settings_are_frozen():
    s = load_settings({})
    with pytest.raises(ValidationError):
        s.port = 1


def test_list_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("MIXTRAL_API_KEY", "k1, k2")
    monkeypatch.setenv("MIXTRAL_SERVED_MODEL_NAME", '["mixtral", "open-mixtral-8x7b"]')
    s = load_settings({})
    assert s.api_keys == ["k1", "k2"] and s.served_model_name == ["mixtral", "open-mixtral-8x7b"]
    monkeypatch.setenv("MIXTRAL_API_KEY", "")  # compose passes an empty value when no key is set
    assert load_settings({}).api_keys == []


def help_text() -> tuple[str, bool]:
    """`mixtral-server --help` as a new process prints it, and whether torch got imported."""
    code = (
        "import contextlib, io, sys\n"
        "from server.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print(out.getvalue())\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    text, _, torch_loaded = done.stdout.rstrip().rpartition("\n")
    return text, torch_loaded == "True"


def test_help_shows_every_default_and_the_demos_without_loading_torch():
    text, torch_loaded = help_text()
    assert not torch_loaded  # parsing comes first: --help answers at once
    flat = " ".join(text.split())  # argparse wraps lines
    for name in ("demo", "demo-moe"):  # textwrap may break a line after a hyphen
        assert f"{name}:SmolLM2-135M-Instruct" in "".join(text.split()), name
    defaults = ServerSettings()
    for name in ("port", "host", "max_num_seqs", "gpu_memory_utilization", "quantization", "block_size"):
        flag = "--" + name.replace("_", "-")
        after = flat.split(f" {flag} ", 1)[1]
        assert after.split(" --", 1)[0].rstrip().endswith(f"(default: {getattr(defaults, name)})"), flag
    for name in ServerSettings.model_fields:  # every setting is in the help, with a flag or not
        flag = name.replace("_", "-")
        assert f"--{flag}" in flat or f"--no-{flag}" in flat or f"{name} (default: " in flat, name
    assert "(default: demo)" in flat


def test_the_engine_settings_come_from_engine_args():
    """One source: every engine setting is a server setting with EngineArgs' default, and is
    validated by EngineArgs."""
    defaults = ServerSettings()
    for f in fields(EngineArgs):
        assert f.name in ServerSettings.model_fields, f.name
        assert getattr(defaults, f.name) == f.default, f.name
    assert defaults.engine_args() == EngineArgs()
    for bad in (
        {"gpu_memory_utilization": 1.5},
        {"device": "tpu"},
        {"max_queue_time_s": -1},
        {"block_size": 0},
    ):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            load_settings(bad)
    assert load_settings({"kernels": "torch"}).engine_args().kernels == "torch"


def test_dtype_aliases_are_accepted_as_before(monkeypatch, tmp_path):
    assert load_settings({"dtype": "bf16"}).dtype == "bfloat16"
    monkeypatch.setenv("MIXTRAL_DTYPE", "fp16")
    assert load_settings({}).engine_args().dtype == "float16"
    with pytest.raises(ValidationError, match="dtype"):
        load_settings({"dtype": "int3"})
