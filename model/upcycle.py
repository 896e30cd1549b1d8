"""An "upcycled" Mixtral-layout checkpoint from a dense one: the MoE path on a real model.

Expert e is the dense SwiGLU FFN with its intermediate neurons permuted by its own permutation
(rows of w1 and w3, columns of w2, alike), so every expert computes exactly the dense FFN and,
since the router's top-2 weights sum to one, the model equals the dense one up to rounding. A
mismatched slice or a wrong segment offset in MoE dispatch breaks that equality at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model")


def upcycle(dense_dir: Path, out: Path, num_experts: int = 8, top_k: int = 2, seed: int = 0) -> Path:
    """Write a Mixtral HF checkpoint (published key layout) equivalent to the dense Llama one."""
    config = json.loads((dense_dir / "config.json").read_text())
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    g = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(dense_dir / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            w = f.get_tensor(name)
            if ".mlp." not in name:
                tensors[name] = w
                continue
            if not name.endswith("mlp.gate_proj.weight"):
                continue
            prefix = name.removesuffix("mlp.gate_proj.weight")
            w1, w3 = w, f.get_tensor(prefix + "mlp.up_proj.weight")  # [F, D]
            w2 = f.get_tensor(prefix + "mlp.down_proj.weight")  # [D, F]
            moe = prefix + "block_sparse_moe."
            tensors[moe + "gate.weight"] = torch.randn(num_experts, hidden, generator=g) * hidden**-0.5
            for e in range(num_experts):
                perm = torch.randperm(ffn, generator=g)
                tensors[f"{moe}experts.{e}.w1.weight"] = w1[perm].contiguous()
                tensors[f"{moe}experts.{e}.w3.weight"] = w3[perm].contiguous()
                tensors[f"{moe}experts.{e}.w2.weight"] = w2[:, perm].contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    moe_config = config | {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": num_experts,
        "num_experts_per_tok": top_k,
        "sliding_window": None,
    }
    moe_config.pop("head_dim", None)  # Mixtral derives it (equal here: hidden / heads)
    (out / "config.json").write_text(json.dumps(moe_config, indent=2))
    for name in _TOKENIZER_FILES:
        if (dense_dir / name).is_file():
            shutil.copy(dense_dir / name, out / name)
    return out
