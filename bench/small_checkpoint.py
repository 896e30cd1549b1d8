"""The "small" random-weight Mixtral of PERFORMANCE.md, written once as an HF checkpoint.

hidden 512, ffn 1024, 8 layers, 8 experts top-2, 8 q / 2 kv heads, vocab 32000 (139M
parameters), bf16, with Mixtral's v1 tokenizer from mistral-common.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mistral_common
import torch

SMALL = {
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 4096,
    "rope_theta": 1e6,
}


def write_small_checkpoint(out: Path, seed: int = 0) -> Path:
    """Random weights (transformers' init), saved in bf16 in the published HF layout."""
    from transformers import MixtralConfig, MixtralForCausalLM

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**SMALL)).to(torch.bfloat16)
    model.save_pretrained(out)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", out / "tokenizer.model")
    return out
