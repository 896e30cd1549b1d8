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
A placement may read a part of its tensor (`source`): a rank's share under tensor or expert
parallelism, read alone from the memory-mapped file.
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
from model.parallel import SINGLE, Parallel

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
    source: tuple[slice, ...] = ()  # the part of the checkpoint tensor read (a rank's share); () all


# Each checkpoint tensor fills one or more regions (a fused gate/up tensor split over ranks).
Placements = dict[str, tuple[Placement, ...]]

# Tensors some checkpoints carry that hold no weights we need (precomputed rotary tables).
IGNORED_TENSORS = re.compile(r"(.*\.rotary_emb\.inv_freq|rope\.freqs)$")


def interleaved_to_half(num_heads: int) -> Transform:
    """Permute q/k rows from interleaved rotary pairs (Mistral) to rotate-half (HF) order."""

    def permute(w: torch.Tensor) -> torch.Tensor:
        out_dim, in_dim = w.shape
        pairs = out_dim // num_heads // 2
        return w.reshape(num_heads, pairs, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)

    return permute


def _transpose(w: torch.Tensor) -> torch.Tensor:
    return w.t()


def _rows(r: range, scale: int = 1, offset: int = 0) -> slice:
    return slice(offset + r.start * scale, offset + r.stop * scale)


def layout_names(cfg: ModelConfig, layout: Layout, parallel: Parallel = SINGLE) -> Placements:
    """Every tensor name a checkpoint of `layout` must hold for `cfg`, with its placement.

    With a `Parallel` of several ranks: the tensors one rank reads, each placed as its share
    (`model.parallel`); under expert parallelism other ranks' experts are not in the map.
    """
    hf = layout in (Layout.HF, Layout.HF_FUSED)
    out: Placements = {}
    for i in range(cfg.num_layers):
        out |= _hf_layer(cfg, i, layout, parallel) if hf else _consolidated_layer(cfg, i, layout, parallel)
    embed, norm, head = (
        ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
        if hf
        else ("tok_embeddings.weight", "norm.weight", "output.weight")
    )
    vocab = (_rows(parallel.vocab(cfg.vocab_size)),)
    out[embed] = (Placement("embed_tokens.weight", source=vocab),)
    out[norm] = (Placement("norm.weight"),)
    if not cfg.tie_word_embeddings:
        out[head] = (Placement("lm_head.weight", source=vocab),)
    return out


def optional_names(cfg: ModelConfig, layout: Layout) -> set[str]:
    """Names that may be present without being needed (a tied output head saved anyway)."""
    if not cfg.tie_word_embeddings:
        return set()
    return {"lm_head.weight" if layout in (Layout.HF, Layout.HF_FUSED) else "output.weight"}


def _attention(
    cfg: ModelConfig, layer: str, src: dict[str, str], interleaved: bool, parallel: Parallel
) -> Placements:
    dh = cfg.head_dim
    heads, kv_heads = parallel.heads(cfg.num_heads), parallel.kv_heads(cfg.num_kv_heads)
    q, kv = len(heads) * dh, len(kv_heads) * dh
    qkv = f"{layer}.attn.qkv_proj.weight"
    perm_q = interleaved_to_half(len(heads)) if interleaved else None  # per head: slicing heads commutes
    perm_k = interleaved_to_half(len(kv_heads)) if interleaved else None
    q_rows, kv_rows = (_rows(heads, dh),), (_rows(kv_heads, dh),)
    return {
        src["q"]: (Placement(qkv, (slice(0, q),), perm_q, q_rows),),
        src["k"]: (Placement(qkv, (slice(q, q + kv),), perm_k, kv_rows),),
        src["v"]: (Placement(qkv, (slice(q + kv, q + 2 * kv),), source=kv_rows),),
        src["o"]: (Placement(f"{layer}.attn.o_proj.weight", source=(slice(None), *q_rows)),),
    }


def _experts(
    cfg: ModelConfig, ffn: str, prefix: str, names: tuple[str, str, str], parallel: Parallel
) -> Placements:
    """Per-expert tensors `{prefix}.{e}.{gate|up|down}`, or a dense FFN as expert 0 when E = 1."""
    share = parallel.ffn(cfg.intermediate_size)
    f, rows = len(share), _rows(share)
    gate, up, down = names
    out: Placements = {}
    for local, e in enumerate(parallel.experts(cfg.moe.num_experts if cfg.moe else 1)):
        x = f"{prefix}.{e}" if cfg.moe else prefix
        out[f"{x}.{gate}"] = (Placement(f"{ffn}.w13", (local, slice(0, f)), source=(rows,)),)
        out[f"{x}.{up}"] = (Placement(f"{ffn}.w13", (local, slice(f, 2 * f)), source=(rows,)),)
        out[f"{x}.{down}"] = (Placement(f"{ffn}.w2", (local,), source=(slice(None), rows)),)
    return out


def _hf_layer(cfg: ModelConfig, i: int, layout: Layout, parallel: Parallel) -> Placements:
    src, ours = f"model.layers.{i}", f"layers.{i}"
    names = {k: f"{src}.self_attn.{k}_proj.weight" for k in "qkvo"}
    out = _attention(cfg, ours, names, False, parallel)
    out[f"{src}.input_layernorm.weight"] = (Placement(f"{ours}.input_norm.weight"),)
    out[f"{src}.post_attention_layernorm.weight"] = (Placement(f"{ours}.post_attn_norm.weight"),)
    ffn = f"{ours}.ffn"
    if cfg.moe is None:
        return out | _experts(
            cfg, ffn, f"{src}.mlp", ("gate_proj.weight", "up_proj.weight", "down_proj.weight"), parallel
        )
    if layout is Layout.HF_FUSED:
        share, full = parallel.ffn(cfg.intermediate_size), cfg.intermediate_size
        f, experts = len(share), _rows(parallel.experts(cfg.moe.num_experts))
        every = slice(None)
        out[f"{src}.mlp.gate.weight"] = (Placement(f"{ffn}.gate.weight"),)
        out[f"{src}.mlp.experts.gate_up_proj"] = (
            Placement(f"{ffn}.w13", (every, slice(0, f)), source=(experts, _rows(share))),
            Placement(f"{ffn}.w13", (every, slice(f, 2 * f)), source=(experts, _rows(share, offset=full))),
        )
        out[f"{src}.mlp.experts.down_proj"] = (Placement(f"{ffn}.w2", source=(experts, every, _rows(share))),)
        return out
    moe = f"{src}.block_sparse_moe"
    out[f"{moe}.gate.weight"] = (Placement(f"{ffn}.gate.weight"),)
    return out | _experts(cfg, ffn, f"{moe}.experts", ("w1.weight", "w3.weight", "w2.weight"), parallel)


def _consolidated_layer(cfg: ModelConfig, i: int, layout: Layout, parallel: Parallel) -> Placements:
    layer = f"layers.{i}"  # consolidated names and ours share the layer prefix
    names = {k: f"{layer}.attention.w{k}.weight" for k in "qkvo"}
    out = _attention(cfg, layer, names, True, parallel)
    out[f"{layer}.attention_norm.weight"] = (Placement(f"{layer}.input_norm.weight"),)
    out[f"{layer}.ffn_norm.weight"] = (Placement(f"{layer}.post_attn_norm.weight"),)
    ffn = f"{layer}.ffn"
    w = ("w1.weight", "w3.weight", "w2.weight")
    if cfg.moe is None:
        return out | _experts(cfg, ffn, f"{layer}.feed_forward", w, parallel)
    if layout is Layout.CONSOLIDATED_STACKED:
        moe = f"{layer}.block_sparse_moe"
        out[f"{moe}.gate.weight"] = (Placement(f"{ffn}.gate.weight"),)
        return out | _stacked_experts(cfg, moe, ffn, parallel)
    out[f"{layer}.feed_forward.gate.weight"] = (Placement(f"{ffn}.gate.weight"),)
    return out | _experts(cfg, ffn, f"{layer}.feed_forward.experts", w, parallel)


def _stacked_experts(cfg: ModelConfig, moe: str, ffn: str, parallel: Parallel) -> Placements:
    """`w1`, `w3` [E*F, D] (expert e's rows at e*F) and `w2` [E*F, D] (expert e's w2.T there)."""
    assert cfg.moe is not None
    full, share = cfg.intermediate_size, parallel.ffn(cfg.intermediate_size)
    f = len(share)
    w1, w3, w2 = [], [], []
    for local, e in enumerate(parallel.experts(cfg.moe.num_experts)):
        rows = (_rows(share, offset=e * full),)
        w1.append(Placement(f"{ffn}.w13", (local, slice(0, f)), source=rows))
        w3.append(Placement(f"{ffn}.w13", (local, slice(f, 2 * f)), source=rows))
        w2.append(Placement(f"{ffn}.w2", (local,), _transpose, rows))
    return {f"{moe}.w1": tuple(w1), f"{moe}.w3": tuple(w3), f"{moe}.w2": tuple(w2)}
