"""Where each tensor of each supported checkpoint layout goes in our model.

A layout is a map from checkpoint tensor name to a `Placement`: a parameter of ours, the region of
it the tensor fills (an expert, the gate or up half of a fused matrix, the q/k/v rows of the fused
projection) and the transform the tensor needs first (a transpose, the rotary permutation). The
loader checks the names in a checkpoint against this map, so a missing or unexpected tensor is an
error that names it.

Layouts (`Layout`):
- HF: Hugging Face as published for Mixtral-8x7B-Instruct-v0.1 (`block_sparse_moe.experts.{e}.w1`),
  and the dense Mistral / Llama FFN (`mlp.gate_proj`, `up_proj`, `down_proj`).
- HF_FUSED: transformers 5.x (`mlp.experts.gate_up_proj [E, 2F, D]` gate first, `down_proj`).
- CONSOLIDATED: Mistral's `consolidated.safetensors` (`feed_forward.experts.{e}.w1`).
- CONSOLIDATED_STACKED: the original 2023 `consolidated.00.pth` (`block_sparse_moe.w1 [E*F, D]`,
  w2 stored transposed, `[E*F, D]` holding each expert's w2.T).
Consolidated q/k weights use interleaved rotary pairs; they are permuted to the rotate-half
convention our forward uses (the permutation transformers' conversion script applies).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.config import ModelConfig

Transform = Callable[[torch.Tensor], torch.Tensor]
Region = tuple[int | slice, ...]


class Layout(enum.Enum):
    HF = "hf"
    HF_FUSED = "hf-fused"
    CONSOLIDATED = "consolidated"
    CONSOLIDATED_STACKED = "consolidated-stacked"


@dataclass(frozen=True)
class Placement:
    param: str  # our parameter name
    region: Region = ()  # indexers into the parameter: param[region] is the destination
    transform: Transform | None = field(default=None, compare=False)


# Tensors some checkpoints carry that hold no weights we need (precomputed rotary tables).
IGNORED_TENSORS = re.compile(r"(.*\.rotary_emb\.inv_freq|rope\.freqs)$")


def interleaved_to_half(num_heads: int) -> Transform:
    """Permute q/k rows from interleaved rotary pairs (Mistral) to rotate-half (HF) order."""

    def permute(w: torch.Tensor) -> torch.Tensor:
        out_dim, in_dim = w.shape
        pairs = out_dim // num_heads // 2
        return w.reshape(num_heads, pairs, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)

    return permute


def layout_names(cfg: ModelConfig, layout: Layout) -> dict[str, Placement]:
    """Every tensor name a checkpoint of `layout` must hold for `cfg`, with its placement."""
    hf = layout in (Layout.HF, Layout.HF_FUSED)
    out: dict[str, Placement] = {}
    for i in range(cfg.num_layers):
        out |= _hf_layer(cfg, i, layout) if hf else _consolidated_layer(cfg, i, layout)
    embed, norm, head = (
        ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
        if hf
        else ("tok_embeddings.weight", "norm.weight", "output.weight")
    )
    out[embed] = Placement("embed_tokens.weight")
    out[norm] = Placement("norm.weight")
    if not cfg.tie_word_embeddings:
        out[head] = Placement("lm_head.weight")
    return out


def optional_names(cfg: ModelConfig, layout: Layout) -> set[str]:
    """Names that may be present without being needed (a tied output head saved anyway)."""
    if not cfg.tie_word_embeddings:
        return set()
    return {"lm_head.weight" if layout in (Layout.HF, Layout.HF_FUSED) else "output.weight"}


def _attention(cfg: ModelConfig, layer: str, src: dict[str, str], interleaved: bool) -> dict[str, Placement]:
    q = cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    qkv = f"{layer}.attn.qkv_proj.weight"
    perm_q = interleaved_to_half(cfg.num_heads) if interleaved else None
    perm_k = interleaved_to_half(cfg.num_kv_heads) if interleaved else None
    return {
        src["q"]: Placement(qkv, (slice(0, q),), perm_q),
        src["k"]: Placement(qkv, (slice(q, q + kv),), perm_k),
        src["v"]: Placement(qkv, (slice(q + kv, q + 2 * kv),)),
        src["o"]: Placement(f"{layer}.attn.o_proj.weight"),
    }


def _experts(cfg: ModelConfig, ffn: str, prefix: str, names: tuple[str, str, str]) -> dict[str, Placement]:
    """Per-expert tensors `{prefix}.{e}.{gate|up|down}`, or a dense FFN as expert 0 when E = 1."""
    f = cfg.intermediate_size
    gate, up, down = names
    out = {}
    num = cfg.moe.num_experts if cfg.moe else 1
    for e in range(num):
        x = f"{prefix}.{e}" if cfg.moe else prefix
        out[f"{x}.{gate}"] = Placement(f"{ffn}.w13", (e, slice(0, f)))
        out[f"{x}.{up}"] = Placement(f"{ffn}.w13", (e, slice(f, 2 * f)))
        out[f"{x}.{down}"] = Placement(f"{ffn}.w2", (e,))
    return out


def _hf_layer(cfg: ModelConfig, i: int, layout: Layout) -> dict[str, Placement]:
    src, ours = f"model.layers.{i}", f"layers.{i}"
    names = {k: f"{src}.self_attn.{k}_proj.weight" for k in "qkvo"}
    out = _attention(cfg, ours, names, interleaved=False)
    out[f"{src}.input_layernorm.weight"] = Placement(f"{ours}.input_norm.weight")
    out[f"{src}.post_attention_layernorm.weight"] = Placement(f"{ours}.post_attn_norm.weight")
    ffn = f"{ours}.ffn"
    if cfg.moe is None:
        return out | _experts(
            cfg, ffn, f"{src}.mlp", ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
        )
    if layout is Layout.HF_FUSED:
        out[f"{src}.mlp.gate.weight"] = Placement(f"{ffn}.gate.weight")
        out[f"{src}.mlp.experts.gate_up_proj"] = Placement(f"{ffn}.w13")
        out[f"{src}.mlp.experts.down_proj"] = Placement(f"{ffn}.w2")
        return out
    moe = f"{src}.block_sparse_moe"
    out[f"{moe}.gate.weight"] = Placement(f"{ffn}.gate.weight")
    return out | _experts(cfg, ffn, f"{moe}.experts", ("w1.weight", "w3.weight", "w2.weight"))


def _consolidated_layer(cfg: ModelConfig, i: int, layout: Layout) -> dict[str, Placement]:
    layer = f"layers.{i}"  # consolidated names and ours share the layer prefix
    names = {k: f"{layer}.attention.w{k}.weight" for k in "qkvo"}
    out = _attention(cfg, layer, names, interleaved=True)
    out[f"{layer}.attention_norm.weight"] = Placement(f"{layer}.input_norm.weight")
    out[f"{layer}.ffn_norm.weight"] = Placement(f"{layer}.post_attn_norm.weight")
    ffn = f"{layer}.ffn"
    if cfg.moe is None:
        return out | _experts(cfg, ffn, f"{layer}.feed_forward", ("w1.weight", "w3.weight", "w2.weight"))
    if layout is Layout.CONSOLIDATED_STACKED:
        moe = f"{layer}.block_sparse_moe"
        out[f"{moe}.gate.weight"] = Placement(f"{ffn}.gate.weight")
        return out | _stacked_experts(cfg, moe, ffn)
    out[f"{layer}.feed_forward.gate.weight"] = Placement(f"{ffn}.gate.weight")
    return out | _experts(cfg, ffn, f"{layer}.feed_forward.experts", ("w1.weight", "w3.weight", "w2.weight"))


def _stacked_experts(cfg: ModelConfig, moe: str, ffn: str) -> dict[str, Placement]:
    assert cfg.moe is not None
    e, f, d = cfg.moe.num_experts, cfg.intermediate_size, cfg.hidden_size

    def split(w: torch.Tensor) -> torch.Tensor:  # [E*F, D] -> [E, F, D]
        return w.reshape(e, f, d)

    def split_t(w: torch.Tensor) -> torch.Tensor:  # [E*F, D] (w2[e].T stacked) -> [E, D, F]
        return w.reshape(e, f, d).transpose(1, 2)

    everything = slice(None)
    return {
        f"{moe}.w1": Placement(f"{ffn}.w13", (everything, slice(0, f)), split),
        f"{moe}.w3": Placement(f"{ffn}.w13", (everything, slice(f, 2 * f)), split),
        f"{moe}.w2": Placement(f"{ffn}.w2", (), split_t),
    }
