"""Tiny random checkpoints written at test time, in the layouts people actually download.

Everything is made with transformers (the oracle) and written the way the published checkpoints
are: sharded safetensors + index and a `config.json` with the published keys for the HF layout;
`params.json` with `consolidated.safetensors` or `consolidated.00.pth` for Mistral's layouts.
The Mixtral v1 `tokenizer.model` comes from the mistral-common package.

"Peaky" fixtures use a large initializer range so the top-2 logit gap is clear and greedy
decoding is stable under reduction-order changes (see DESIGN.md).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mistral_common
import torch
from safetensors.torch import save_file

V1_TOKENIZER = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
# Mistral 7B Instruct v0.3's and Mixtral 8x22B Instruct's: tool tokens, 32768 pieces.
V3_TOKENIZER = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"


@dataclass(frozen=True)
class TinyShape:
    vocab_size: int = 32000
    hidden_size: int = 64
    intermediate_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 4
    top_k: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 1_000_000.0
    initializer_range: float = 0.2
    head_dim: int | None = None


def published_mixtral_config(shape: TinyShape) -> dict:
    """config.json with the keys of the published Mixtral-8x7B-Instruct-v0.1, scaled down."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": shape.initializer_range,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "model_type": "mixtral",
        "num_attention_heads": shape.num_heads,
        "num_experts_per_tok": shape.top_k,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "num_local_experts": shape.num_experts,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": shape.rope_theta,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0.dev0",
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }


def published_mixtral_keys(num_layers: int, num_experts: int) -> set[str]:
    """The tensor names of Mixtral-8x7B-Instruct-v0.1's safetensors index, for a scaled model."""
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(num_layers):
        p = f"model.layers.{i}"
        keys |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        keys |= {f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"}
        keys.add(f"{p}.block_sparse_moe.gate.weight")
        keys |= {
            f"{p}.block_sparse_moe.experts.{e}.w{w}.weight" for e in range(num_experts) for w in (1, 2, 3)
        }
    return keys


def hf_mixtral(shape: TinyShape, seed: int = 0):
    """A random transformers MixtralForCausalLM in fp32 (the oracle), eval mode."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        initializer_range=shape.initializer_range,
        head_dim=shape.head_dim,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).eval()
    model.config._experts_implementation = "eager"
    return model


def hf_dense(kind: str, shape: TinyShape, seed: int = 0, tie: bool = False):
    """A random transformers MistralForCausalLM or LlamaForCausalLM in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls = {
        "mistral": (MistralConfig, MistralForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }[kind]
    cfg = config_cls(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        initializer_range=shape.initializer_range,
        head_dim=shape.head_dim,
        tie_word_embeddings=tie,
        sliding_window=None,
    )
    torch.manual_seed(seed)
    return model_cls(cfg).eval()


def write_hf_mixtral(model, shape: TinyShape, out: Path, tokenizer: Path = V1_TOKENIZER) -> Path:
    """Save in the published HF layout: shards + index, published config keys, and the tokenizer
    (v1's unless told) as a plain `tokenizer.model`, the name published checkpoints use."""
    model.save_pretrained(out, max_shard_size="1MB")
    (out / "config.json").write_text(json.dumps(published_mixtral_config(shape), indent=2))
    shutil.copy(tokenizer, out / "tokenizer.model")
    return out


def write_hf_fused(model, out: Path) -> Path:
    """transformers 5.x in-memory layout: `mlp.experts.gate_up_proj` / `down_proj`, one file."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(out / "config.json"))
    return out


def half_to_interleaved(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of the HF conversion's q/k permutation: rotate-half rows back to interleaved pairs."""
    out_dim, in_dim = w.shape
    return w.reshape(num_heads, 2, out_dim // num_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def consolidated_state(model, shape: TinyShape, stacked: bool) -> dict[str, torch.Tensor]:
    """Mistral's consolidated tensor names from an HF model; q/k in interleaved rotary order."""
    sd = model.state_dict()
    f, d = shape.intermediate_size, shape.hidden_size
    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(shape.num_layers):
        p, c = f"model.layers.{i}", f"layers.{i}"
        out[f"{c}.attention.wq.weight"] = half_to_interleaved(
            sd[f"{p}.self_attn.q_proj.weight"], shape.num_heads
        )
        out[f"{c}.attention.wk.weight"] = half_to_interleaved(
            sd[f"{p}.self_attn.k_proj.weight"], shape.num_kv_heads
        )
        out[f"{c}.attention.wv.weight"] = sd[f"{p}.self_attn.v_proj.weight"]
        out[f"{c}.attention.wo.weight"] = sd[f"{p}.self_attn.o_proj.weight"]
        out[f"{c}.attention_norm.weight"] = sd[f"{p}.input_layernorm.weight"]
        out[f"{c}.ffn_norm.weight"] = sd[f"{p}.post_attention_layernorm.weight"]
        gate_up = sd[f"{p}.mlp.experts.gate_up_proj"]  # [E, 2F, D]
        down = sd[f"{p}.mlp.experts.down_proj"]  # [E, D, F]
        w1, w3 = gate_up[:, :f], gate_up[:, f:]
        if stacked:
            m = f"{c}.block_sparse_moe"
            out[f"{m}.gate.weight"] = sd[f"{p}.mlp.gate.weight"]
            out[f"{m}.w1"] = w1.reshape(-1, d)
            out[f"{m}.w3"] = w3.reshape(-1, d)
            out[f"{m}.w2"] = down.transpose(1, 2).reshape(-1, d)
        else:
            m = f"{c}.feed_forward"
            out[f"{m}.gate.weight"] = sd[f"{p}.mlp.gate.weight"]
            for e in range(shape.num_experts):
                out[f"{m}.experts.{e}.w1.weight"] = w1[e]
                out[f"{m}.experts.{e}.w2.weight"] = down[e]
                out[f"{m}.experts.{e}.w3.weight"] = w3[e]
    return {k: v.contiguous().clone() for k, v in out.items()}


def consolidated_params(shape: TinyShape) -> dict:
    """params.json as Mistral publishes it (mistral-inference `ModelArgs` field names)."""
    return {
        "dim": shape.hidden_size,
        "n_layers": shape.num_layers,
        "head_dim": shape.head_dim or shape.hidden_size // shape.num_heads,
        "hidden_dim": shape.intermediate_size,
        "n_heads": shape.num_heads,
        "n_kv_heads": shape.num_kv_heads,
        "norm_eps": 1e-05,
        "vocab_size": shape.vocab_size,
        "rope_theta": shape.rope_theta,
        "max_seq_len": shape.max_position_embeddings,
        "moe": {"num_experts_per_tok": shape.top_k, "num_experts": shape.num_experts},
    }


def write_consolidated(model, shape: TinyShape, out: Path, stacked: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    state = consolidated_state(model, shape, stacked)
    if stacked:
        torch.save(state, out / "consolidated.00.pth")
    else:
        save_file(state, str(out / "consolidated.safetensors"))
    (out / "params.json").write_text(json.dumps(consolidated_params(shape), indent=2))
    shutil.copy(V1_TOKENIZER, out / "tokenizer.model")
    return out
