"""Convert a llama-architecture GGUF file (the SmolLM2 demo) into a Hugging Face checkpoint directory.

Weights are dequantized with the `gguf` package and written as fp32 safetensors; q/k, which
llama.cpp's converter stored permuted for interleaved rotary, are permuted back to the
rotate-half layout; the output head stays tied to the embedding when the file has none. The
tokenizer (GPT-2 style byte-level BPE) is rebuilt as a `tokenizer.json` with the `tokenizers`
library, and the chat template is written beside it. transformers' own GGUF loader is the oracle
for all of this in the tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from model.checkpoint_layouts import interleaved_to_half

# GGUF token types (llama.cpp `llama_token_type`).
_CONTROL = 3


class GGUFError(ValueError):
    """The GGUF file is not one this converter understands."""


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise GGUFError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()


def _hf_name(name: str) -> str | None:
    """GGUF tensor name -> HF Llama name."""
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if parts[0] != "blk":
        return None
    i, rest = parts[1], ".".join(parts[2:])
    table = {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }
    return f"model.layers.{i}.{table[rest]}" if rest in table else None


def read_llama_config(reader) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"architecture {arch!r} is not supported (only llama)")
    p = "llama."
    heads = int(_field(reader, p + "attention.head_count"))
    hidden = int(_field(reader, p + "embedding_length"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, p + "attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, p + "rope.dimension_count", hidden // heads)),
        "rope_theta": float(_field(reader, p + "rope.freq_base", 10000.0)),
        "rms_norm_eps": float(_field(reader, p + "attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(_field(reader, p + "context_length")),
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        "hidden_act": "silu",
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": "float32",
    }


def read_weights(
    reader, config: dict[str, Any], progress: Callable[[int, int], None] | None = None
) -> dict[str, torch.Tensor]:
    """Dequantized fp32 tensors under HF names, q/k back in rotate-half order.

    `progress(done, total)` is called after each tensor.
    """
    import gguf

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    fix = {"q_proj": interleaved_to_half(heads), "k_proj": interleaved_to_half(kv_heads)}
    out: dict[str, torch.Tensor] = {}
    for done, t in enumerate(reader.tensors, 1):
        name = _hf_name(t.name)
        if name is None:
            raise GGUFError(f"unexpected tensor {t.name!r}")
        array = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        tensor = torch.from_numpy(np.array(array, copy=True))  # writable: torch wants to own it
        for key, permute in fix.items():
            if f".{key}." in name:
                tensor = permute(tensor)
        out[name] = tensor.contiguous()
        if progress is not None:
            progress(done, len(reader.tensors))
    return out


def write_tokenizer(reader, out: Path) -> None:
    """tokenizer.json (byte-level BPE), tokenizer_config.json and chat_template.jinja."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise GGUFError("only GPT-2 style (byte-level BPE) GGUF tokenizers are supported")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    # SmolLM's pre-tokenizer ("smollm" in llama.cpp): digits one by one, then GPT-2's byte-level split.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, types, strict=True) if kind == _CONTROL]
    special = [AddedToken(t, special=True, normalized=False) for t in control]
    tok.add_special_tokens(special)
    tok.save(str(out / "tokenizer.json"))
    bos = tokens[int(_field(reader, "tokenizer.ggml.bos_token_id"))]
    eos = tokens[int(_field(reader, "tokenizer.ggml.eos_token_id"))]
    (out / "chat_template.jinja").write_text(_field(reader, "tokenizer.chat_template"))
    config = {"bos_token": bos, "eos_token": eos, "add_bos_token": False, "model_max_length": 8192}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def convert_gguf(gguf_path: Path, out: Path, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `out/` (config.json, model.safetensors, tokenizer files) from a GGUF file.

    `progress(done, total)` is called after each tensor is dequantized.
    """
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    config = read_llama_config(reader)
    weights = read_weights(reader, config, progress)
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(reader, out)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
