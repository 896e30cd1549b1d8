"""The decoder: Mixtral 8x7B, and dense Mistral / Llama checkpoints as the same code without a router.

The forward runs on a flat batch of tokens from many sequences (see `model.batch`) and reads and
writes a paged KV cache `[L, 2, N, B, K, Dh]`. It makes no host sync on the decode path except
in the torch MoE, which reads expert counts (the fused kernel path does not).

Shape legend: T tokens, D hidden size, H query heads, K kv heads, Dh head dim, V vocab size,
L layers, N cache blocks, B block size, S sequences.
"""

from __future__ import annotations

import torch
from torch import nn

from model.backend import Kernels
from model.batch import AttentionMetadata
from model.config import ModelConfig
from model.layers import RMSNorm, RotaryEmbedding, apply_rotary
from model.moe import FeedForward
from model.parallel import SINGLE, Parallel
from model.quant import QuantLinear, WeightQuant
from model.torch_backend.kernels import TORCH_KERNELS
from model.torch_backend.packed import PackedLinear, packing_supported


class Attention(nn.Module):
    """Grouped-query attention with fused q/k/v projection over the paged cache.

    Under tensor parallelism it holds this rank's heads (`Parallel.heads`, `Parallel.kv_heads`)
    and its output projection's partial sums are all-reduced.
    """

    def __init__(self, config: ModelConfig, parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.parallel = parallel
        self.num_heads = len(parallel.heads(config.num_heads))
        self.num_kv_heads = len(parallel.kv_heads(config.num_kv_heads))
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        q_size = self.num_heads * config.head_dim
        kv_size = self.num_kv_heads * config.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)
        self.kernels: Kernels = TORCH_KERNELS

    def forward(
        self,
        x: torch.Tensor,  # [T, D]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [T, 1, Dh]
        kv_cache: torch.Tensor,  # [2, N, B, K, Dh]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, Dh]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, K, Dh]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, K, Dh]
        q, k = apply_rotary(q, k, *rope)
        self.kernels.write_kv(kv_cache, k, v, meta.slot_mapping)
        out = self.kernels.attention(q, kv_cache, meta, self.scale)  # [T, H, Dh]
        return self.parallel.all_reduce(self.o_proj(out.view(num_tokens, -1)))


class VocabEmbedding(nn.Module):
    """The token embedding; under tensor parallelism this rank's rows of it (`Parallel.vocab`),
    other ranks' tokens giving zeros here, and the rows all-reduced."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.parallel = parallel
        self.rows = parallel.vocab(vocab_size)
        self.weight = nn.Parameter(torch.empty(len(self.rows), hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, D]
        if self.parallel.size == 1:
            return nn.functional.embedding(input_ids, self.weight)
        local = input_ids - self.rows.start
        here = (local >= 0) & (local < len(self.rows))  # [T]
        x = nn.functional.embedding(local.clamp(0, len(self.rows) - 1), self.weight)
        return self.parallel.all_reduce(x * here.unsqueeze(1).to(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, parallel: Parallel = SINGLE) -> None:
        super().__init__()
        moe = config.moe
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, parallel)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = FeedForward(
            config.hidden_size,
            config.intermediate_size,
            num_experts=moe.num_experts if moe else 1,
            top_k=moe.top_k if moe else 1,
            parallel=parallel,
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, D] -> [T, D]
        x = x + self.attn(self.input_norm(x), rope, kv_cache, meta)
        return x + self.ffn(self.post_attn_norm(x))


class MixtralModel(nn.Module):
    """Token ids of a flat batch in, final hidden states out; `compute_logits` for the rows needed.

    Built with a `Parallel` of several ranks, it is one rank's share of the model (see
    `model.parallel`): every rank runs the same forward on the same batch, in step.
    """

    def __init__(self, config: ModelConfig, parallel: Parallel = SINGLE) -> None:
        super().__init__()
        parallel.check(config)
        self.config = config
        self.parallel = parallel
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, parallel)
        self.layers = nn.ModuleList(DecoderLayer(config, parallel) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.lm_head = nn.Linear(config.hidden_size, len(parallel.vocab(config.vocab_size)), bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the checkpoint ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        kv_caches: torch.Tensor,  # [L, 2, N, B, K, Dh]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, D]
        x = self.embed_tokens(input_ids)
        rope = self.rotary(meta.positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, rope, kv_cache, meta)
        return self.norm(x)

    @property
    def kernels(self) -> Kernels:
        return self.layers[0].attn.kernels

    def use_kernels(self, kernels: Kernels) -> None:
        """Run attention and the routed experts of every layer on `kernels` (see `model.ops`)."""
        for layer in self.layers:
            layer.attn.kernels = kernels
            layer.ffn.kernels = kernels

    def quantize_experts_(self, scheme: WeightQuant) -> None:
        """Store every layer's experts in 8 bits (empty on the meta device, see `FeedForward.quantize_`)."""
        for layer in self.layers:
            layer.ffn.quantize_(scheme)

    @torch.no_grad()
    def quantize_linears_(self, scheme: WeightQuant) -> None:
        """Store attention's projections and the LM head in 8 bits too (`QuantLinear`), one matrix
        at a time; with 8-bit experts, every linear layer but the router is then 8-bit."""
        for layer in self.layers:
            layer.attn.qkv_proj = QuantLinear(layer.attn.qkv_proj.weight, scheme)
            layer.attn.o_proj = QuantLinear(layer.attn.o_proj.weight, scheme)
        self.lm_head = QuantLinear(self.lm_head.weight, scheme)  # a tied embedding stays 16-bit

    def pack_for_cpu(self) -> bool:
        """Prepack every GEMM weight for oneDNN (see `model.torch_backend.packed`) but those the
        native decode step packed already (`model.native`); one-way, CPU only.

        Returns False (and changes nothing) where packing is unavailable.
        """
        weight = self.embed_tokens.weight
        if weight.device.type != "cpu" or not packing_supported(weight.dtype) or self.kernels.name != "torch":
            return False
        with torch.no_grad():
            for layer in self.layers:
                layer.attn.qkv_proj = _packed(layer.attn.qkv_proj)
                layer.attn.o_proj = _packed(layer.attn.o_proj)
                layer.ffn.pack_for_cpu()
            self.lm_head = _packed(self.lm_head)
        return True

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [S, D] -> [S, V] fp32
        """The logits of `hidden`'s rows. Under tensor parallelism every rank calls it (a
        collective); rank 0 gets all [S, V], the other ranks their own vocabulary share [S, V/N]."""
        return self.parallel.gather_vocab(self.lm_head(hidden).float())


def _packed(linear: nn.Module) -> nn.Module:
    """A 16-bit `nn.Linear` prepacked for oneDNN; an 8-bit `QuantLinear` stays as it is."""
    return PackedLinear(linear.weight) if isinstance(linear, nn.Linear) else linear


def allocate_kv_cache(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    parallel: Parallel = SINGLE,
) -> torch.Tensor:
    """The paged KV pool `[L, 2, N, B, K, Dh]` of this rank's kv heads, zeroed.

    Every slot is written before it is read, so the zeros are not for correctness: writing the
    pool once makes all of it resident now. Left empty, a CPU pool's pages would become resident
    one by one as blocks are first used, so the process would grow for hours and could be killed
    for memory long after it said it was ready.
    """
    kv_heads = len(parallel.kv_heads(config.num_kv_heads))
    shape = (config.num_layers, 2, num_blocks, block_size, kv_heads, config.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)


def kv_cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype, parallel: Parallel = SINGLE) -> int:
    """Bytes of KV cache one token takes across all layers on one rank (128 KiB for Mixtral 8x7B
    in bf16 on one rank, 64 KiB on each of two)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    kv_heads = len(parallel.kv_heads(config.num_kv_heads))
    return config.num_layers * 2 * kv_heads * config.head_dim * itemsize
