"""Settings precedence: defaults < YAML file < MIXTRAL_* environment < command-line flags."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.cli import parse_args
from server.settings import load_settings


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
