"""Tile configurations of the fused MoE kernel, per GPU and token count.

Seeded from vLLM's tuned configs for Mixtral 8x7B at tensor-parallel size 1 (E=8, N=14336), the
JSON files `vllm/model_executor/layers/fused_moe/configs/E=8,N=14336,device_name=<GPU>.json`
(H100: as in the zyongye/vllm copy at commit 4ca1d92; H200: vllm-project/vllm at 432a38c).
Keys are the token count M of the layer call; the nearest key is used, as vLLM does. Columns:
BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages.

Our gate/up launch carries two accumulators (gate and up, for the fused SiLU-and-multiply) where
vLLM's carries one over 2N columns, so it uses half the table's BLOCK_N when that is 256 (same
register budget). `bench/tune_moe.py` measures candidates on the card at hand and prints a table
in this format; a table for another GPU (or a retuned one) goes here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3

    @property
    def gated_block_n(self) -> int:
        return self.block_n // 2 if self.block_n >= 256 else self.block_n


_Row = tuple[int, int, int, int, int, int]

_H100: dict[int, _Row] = {
    1: (16, 64, 256, 16, 8, 5),
    2: (16, 64, 128, 64, 4, 3),
    4: (16, 64, 128, 64, 4, 3),
    8: (32, 64, 256, 32, 8, 5),
    16: (64, 128, 128, 1, 8, 2),
    24: (16, 128, 256, 1, 8, 3),
    32: (32, 128, 128, 1, 8, 4),
    48: (32, 128, 128, 1, 8, 4),
    64: (64, 128, 128, 1, 8, 4),
    96: (64, 128, 128, 1, 8, 4),
    128: (64, 128, 64, 1, 8, 5),
    256: (128, 128, 64, 1, 4, 5),
    512: (128, 256, 64, 16, 8, 4),
    1024: (128, 256, 64, 64, 8, 4),
    1536: (128, 256, 64, 16, 8, 4),
    2048: (128, 256, 64, 64, 8, 4),
    3072: (128, 256, 64, 32, 8, 3),
    4096: (128, 256, 64, 16, 8, 3),
}

_H200: dict[int, _Row] = {
    1: (16, 128, 128, 16, 4, 5),
    2: (32, 64, 128, 1, 4, 5),
    4: (16, 64, 64, 1, 4, 5),
    8: (16, 128, 128, 1, 4, 5),
    16: (16, 64, 256, 16, 4, 3),
    24: (16, 128, 256, 16, 4, 2),
    32: (16, 128, 128, 16, 8, 3),
    48: (32, 128, 128, 16, 4, 3),
    64: (32, 128, 128, 64, 4, 3),
    96: (32, 128, 128, 64, 4, 3),
    128: (64, 128, 128, 1, 8, 4),
    256: (128, 256, 64, 1, 8, 4),
    512: (128, 256, 64, 16, 8, 4),
    1024: (128, 256, 64, 16, 8, 4),
    1536: (128, 256, 64, 16, 8, 4),
    2048: (128, 256, 64, 32, 8, 4),
    3072: (128, 256, 64, 16, 8, 4),
    4096: (128, 256, 64, 16, 8, 4),
}

# (experts, expert FFN size, device name as torch reports it) -> table
TUNED: dict[tuple[int, int, str], dict[int, _Row]] = {
    (8, 14336, "NVIDIA H100 80GB HBM3"): _H100,
    (8, 14336, "NVIDIA H200"): _H200,
}


def default_config(num_tokens: int, num_experts: int) -> TileConfig:
    """vLLM's untuned default; also what the interpreter runs (few, large programs)."""
    if num_tokens <= num_experts:
        return TileConfig(16, 32, 64, 1, 4, 2)
    return TileConfig(64, 64, 32, 8, 4, 2)


@functools.lru_cache(maxsize=256)
def moe_tile_config(num_experts: int, ffn_size: int, num_tokens: int, device: torch.device) -> TileConfig:
    """The tuned config for this shape on this GPU (nearest token count), else the default."""
    table = None
    if device.type == "cuda":
        table = TUNED.get((num_experts, ffn_size, torch.cuda.get_device_name(device)))
    if table is None:
        return default_config(num_tokens, num_experts)
    nearest = min(table, key=lambda m: abs(m - num_tokens))
    return TileConfig(*table[nearest])
