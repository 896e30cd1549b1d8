"""Model configuration: one frozen description of the decoder, parsed from either checkpoint layout.

Hugging Face checkpoints carry `config.json`; Mistral's consolidated checkpoints carry
`params.json`. Both are turned into a `ModelConfig` here, in one place, and anything we do not
implement is refused with an `UnsupportedConfigError` rather than silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Mistral's reference implementation uses this theta when `params.json` names none (Mixtral).
_CONSOLIDATED_DEFAULT_ROPE_THETA = 1_000_000.0
_HF_DEFAULT_ROPE_THETA = 10_000.0

SUPPORTED_HF_MODEL_TYPES = ("mixtral", "mistral", "llama")

_DTYPE_NAMES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


class UnsupportedConfigError(ValueError):
    """The checkpoint asks for a feature this implementation does not have."""


class ConfigError(ValueError):
    """The checkpoint's configuration is missing or malformed."""


@dataclass(frozen=True, slots=True)
class MoEConfig:
    num_experts: int
    top_k: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything the decoder needs to know; `moe is None` means a dense SwiGLU FFN."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    moe: MoEConfig | None = None
    checkpoint_dtype: str = "bfloat16"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.moe is not None and not 0 < self.moe.top_k <= self.moe.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.moe.top_k} with {self.moe.num_experts} experts")

    def num_expert_parameters(self) -> int:
        """Parameters of the FFN experts (all of them; the dense FFN of a dense model)."""
        experts = self.moe.num_experts if self.moe else 1
        return self.num_layers * experts * 3 * self.hidden_size * self.intermediate_size

    def num_expert_rows(self) -> int:
        """Output channels of the experts' matrices (w1, w3: F each, w2: D): one scale each in 8 bits."""
        experts = self.moe.num_experts if self.moe else 1
        return self.num_layers * experts * (2 * self.intermediate_size + self.hidden_size)

    def num_parameters(self) -> int:
        """Total parameter count (all experts included)."""
        d, f = self.hidden_size, self.intermediate_size
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        experts = self.moe.num_experts if self.moe else 1
        router = d * self.moe.num_experts if self.moe else 0
        per_layer = attn + experts * 3 * d * f + router + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.num_layers * per_layer + self.vocab_size * d + head + d


def normalize_dtype_name(name: str) -> str:
    """'bf16' / 'torch.bfloat16' / 'bfloat16' -> 'bfloat16'; raises for anything else."""
    key = name.removeprefix("torch.").lower()
    if key not in _DTYPE_NAMES:
        raise ConfigError(f"unsupported dtype {name!r}; use one of bfloat16, float16, float32")
    return _DTYPE_NAMES[key]


def _require(raw: dict[str, Any], key: str, source: str) -> Any:
    if key not in raw or raw[key] is None:
        raise ConfigError(f"{source} has no {key!r}")
    return raw[key]


def _check_sliding_window(window: int | None, context: int, source: str) -> None:
    if window is not None and window < context:
        raise UnsupportedConfigError(
            f"{source}: sliding_window={window} is smaller than the context length {context}; "
            "sliding-window attention is not implemented. Serve with a maximum model length "
            f"of at most {window} tokens (max_model_len) to use this checkpoint exactly."
        )


def _hf_rope_theta(raw: dict[str, Any]) -> float:
    """Theta from `rope_theta` (published configs) or `rope_parameters` (transformers 5.x)."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    if scaling:
        raise UnsupportedConfigError(f"config.json: rope_scaling={scaling!r} is not implemented")
    if params:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedConfigError(
                f"config.json: rope_parameters.rope_type={rope_type!r} is not implemented (only 'default')"
            )
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(raw.get("rope_theta", _HF_DEFAULT_ROPE_THETA))


def _check_hf_unsupported(raw: dict[str, Any]) -> None:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_HF_MODEL_TYPES:
        raise UnsupportedConfigError(
            f"config.json: model_type={model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_HF_MODEL_TYPES)}"
        )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfigError(f"config.json: hidden_act={act!r} is not implemented (only 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise UnsupportedConfigError(f"config.json: {flag}=true is not implemented")


def config_from_hf(raw: dict[str, Any], max_model_len: int | None = None) -> ModelConfig:
    """Parse a Hugging Face `config.json` (Mixtral, Mistral or Llama)."""
    _check_hf_unsupported(raw)
    src = "config.json"
    hidden = int(_require(raw, "hidden_size", src))
    heads = int(_require(raw, "num_attention_heads", src))
    max_pos = int(raw.get("max_position_embeddings", 4096))
    _check_sliding_window(raw.get("sliding_window"), max_model_len or max_pos, src)
    moe = None
    if raw["model_type"] == "mixtral":
        moe = MoEConfig(
            num_experts=int(_require(raw, "num_local_experts", src)),
            top_k=int(_require(raw, "num_experts_per_tok", src)),
        )
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    return ModelConfig(
        vocab_size=int(_require(raw, "vocab_size", src)),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size", src)),
        num_layers=int(_require(raw, "num_hidden_layers", src)),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rope_theta=_hf_rope_theta(raw),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        moe=moe,
        checkpoint_dtype=normalize_dtype_name(str(dtype)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=_first_id(raw.get("eos_token_id")),
    )


def _first_id(value: int | list[int] | None) -> int | None:
    return value[0] if isinstance(value, list) else value


# Mixtral 8x7B was trained with a 32k context; params.json does not always say so.
_CONSOLIDATED_DEFAULT_CONTEXT = 32_768


def config_from_consolidated(raw: dict[str, Any], max_model_len: int | None = None) -> ModelConfig:
    """Parse Mistral's `params.json` (field names as mistral-inference's `ModelArgs`)."""
    src = "params.json"
    dim = int(_require(raw, "dim", src))
    heads = int(_require(raw, "n_heads", src))
    context = int(
        raw.get("max_seq_len") or raw.get("max_position_embeddings") or _CONSOLIDATED_DEFAULT_CONTEXT
    )
    _check_sliding_window(raw.get("sliding_window"), max_model_len or context, src)
    if raw.get("rope_scaling") or raw.get("yarn"):
        raise UnsupportedConfigError(f"{src}: rope scaling is not implemented")
    moe_raw = raw.get("moe")
    moe = None
    if moe_raw:
        moe = MoEConfig(num_experts=int(moe_raw["num_experts"]), top_k=int(moe_raw["num_experts_per_tok"]))
    return ModelConfig(
        vocab_size=int(_require(raw, "vocab_size", src)),
        hidden_size=dim,
        intermediate_size=int(_require(raw, "hidden_dim", src)),
        num_layers=int(_require(raw, "n_layers", src)),
        num_heads=heads,
        num_kv_heads=int(raw.get("n_kv_heads") or heads),
        head_dim=int(raw.get("head_dim") or dim // heads),
        rope_theta=float(raw.get("rope_theta") or _CONSOLIDATED_DEFAULT_ROPE_THETA),
        rms_norm_eps=float(raw.get("norm_eps", 1e-5)),
        max_position_embeddings=context,
        tie_word_embeddings=bool(raw.get("tied_embeddings", False)),
        moe=moe,
        checkpoint_dtype="bfloat16",
        bos_token_id=1,
        eos_token_id=2,
    )


def load_config(model_dir: str | Path, max_model_len: int | None = None) -> ModelConfig:
    """Read `config.json` (HF layout) or `params.json` (consolidated layout) from a checkpoint dir."""
    path = Path(model_dir)
    if (path / "config.json").is_file():
        return config_from_hf(json.loads((path / "config.json").read_text()), max_model_len)
    if (path / "params.json").is_file():
        return config_from_consolidated(json.loads((path / "params.json").read_text()), max_model_len)
    raise ConfigError(f"{path}: no config.json (Hugging Face layout) or params.json (consolidated layout)")
