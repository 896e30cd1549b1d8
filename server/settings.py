"""Server configuration: defaults < YAML file (`--config`) < `MIXTRAL_*` environment < CLI flags.

Parsed and validated once into a frozen `ServerSettings`; nothing reads the environment later.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from engine.config import ENGINE_DEFAULTS, EngineArgs
from model.config import normalize_dtype_name
from model.options import DType, KernelChoice, Quantization

ENV_PREFIX = "MIXTRAL_"
# Names `model` takes besides a checkpoint directory: (the kind `model.demo` converts, description).
DEMO_MODELS = {
    "demo": ("dense", "SmolLM2-135M-Instruct, a small real chat model for a demo, not Mixtral"),
    "demo-moe": ("moe", "SmolLM2-135M-Instruct upcycled to 8 experts, top-2: the MoE path, not Mixtral"),
}
DEFAULT_MODEL = "demo"
# A body refused (413, 401) is read and dropped up to this many times `max_body_bytes`, so that a
# client writing it whole before reading sees the answer; beyond it the connection closes.
DISCARD_FACTOR = 4
# Logged once, when /ready turns 200 (whatever the log level), and named in --help and the README.
READY_LINE = "mixtral-server is ready at"


def _split(value: Any) -> Any:
    """`MIXTRAL_API_KEY=a,b` (or a JSON list) from the environment; lists pass through."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


StrList = Annotated[list[str], NoDecode, BeforeValidator(_split)]


def _dtype(value: Any) -> Any:
    """`bf16`, `torch.bfloat16`, ... as the name the engine takes (`bfloat16`)."""
    return normalize_dtype_name(value) if isinstance(value, str) else value


class ServerSettings(BaseSettings):
    """Every setting of the server; YAML keys and `MIXTRAL_<NAME>` variables use these names.

    The engine's settings mirror `engine.config.EngineArgs`, which gives their types and
    defaults and validates them (`engine_args`); the rest belong to the server.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # ---- what is served, and to whom
    model: str | None = None  # checkpoint directory or a DEMO_MODELS name; None: DEFAULT_MODEL
    served_model_name: StrList = Field(default_factory=list)  # first is the id; the rest aliases
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: StrList = Field(default_factory=list)
    # /metrics and /get_load without the key: for routers and endpoint pickers that scrape without
    # one (the Inference Extension's endpoint picker, vllm-router's load poll). They hold counts
    # and timings, never a prompt or a key.
    open_metrics: bool = False
    ui: bool = True  # the playground at /ui/ (server/routes/ui.py); off with --no-ui
    # ---- the engine (engine.config.EngineArgs)
    dtype: Annotated[DType | None, BeforeValidator(_dtype)] = ENGINE_DEFAULTS.dtype  # bf16, fp16, ... too
    device: str = ENGINE_DEFAULTS.device
    quantization: Quantization = ENGINE_DEFAULTS.quantization
    kernels: KernelChoice = ENGINE_DEFAULTS.kernels
    cuda_graph_max_batch: int = ENGINE_DEFAULTS.cuda_graph_max_batch
    max_model_len: int | None = ENGINE_DEFAULTS.max_model_len
    max_num_seqs: int = ENGINE_DEFAULTS.max_num_seqs
    max_num_batched_tokens: int = ENGINE_DEFAULTS.max_num_batched_tokens
    block_size: int = ENGINE_DEFAULTS.block_size
    kv_cache_memory_gb: float | None = ENGINE_DEFAULTS.kv_cache_memory_gb
    gpu_memory_utilization: float = ENGINE_DEFAULTS.gpu_memory_utilization
    enable_prefix_caching: bool = ENGINE_DEFAULTS.enable_prefix_caching
    max_queue_time_s: float = ENGINE_DEFAULTS.max_queue_time_s
    stream_buffer_bytes: int = ENGINE_DEFAULTS.stream_buffer_bytes
    seed: int = ENGINE_DEFAULTS.seed
    tensor_parallel_size: int = ENGINE_DEFAULTS.tensor_parallel_size
    expert_parallel: bool = ENGINE_DEFAULTS.expert_parallel
    collective_timeout_s: float = ENGINE_DEFAULTS.collective_timeout_s
    # ---- requests
    default_temperature: float = 0.7
    max_body_bytes: int = 2 * 1024 * 1024
    cors_origins: StrList = Field(default_factory=list)
    max_waiting_requests: int = 256
    drain_timeout_s: float = 30.0
    # A stream whose client has read nothing for this long is aborted (its KV and slot freed).
    stream_stall_timeout_s: float = Field(default=30.0, gt=0)
    log_level: str = "info"

    @model_validator(mode="after")
    def _valid_engine_args(self) -> ServerSettings:
        self.engine_args()  # raises ValueError naming the setting
        return self

    def engine_args(self) -> EngineArgs:
        """The engine's settings, as the engine takes them."""
        return EngineArgs(**{f.name: getattr(self, f.name) for f in fields(EngineArgs)})

    @property
    def api_keys(self) -> list[str]:
        return list(self.api_key)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (CLI flags and the YAML file, merged by `load_settings`) above the environment:
        # the YAML layer is inserted below the environment there.
        return init_settings, env_settings


def read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    return {k.replace("-", "_"): v for k, v in data.items()}


def load_settings(flags: dict[str, Any], config: Path | None = None) -> ServerSettings:
    """Merge defaults, YAML, environment and flags (`None` flags are unset) into settings."""
    layered: dict[str, Any] = read_yaml(config) if config else {}
    for name in [k for k in layered if f"{ENV_PREFIX}{k.upper()}" in os.environ]:
        del layered[name]  # the environment beats the YAML file
    layered |= {k: v for k, v in flags.items() if v is not None and v != []}
    return ServerSettings(**layered)
