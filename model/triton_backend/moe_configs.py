"""Tile configurations of the fused MoE kernel, per GPU and token count.

Seeded from vLLM's tuned configs for Mixtral 8x7B, the JSON files
`vllm/model_executor/layers/fused_moe/configs/E=8,N=<N>,device_name=<GPU>.json`: at tensor-parallel
size 1 (N=14336; H100: as in the zyongye/vllm copy at commit 4ca1d92; H200: vllm-project/vllm at
432a38c), and one rank's slice of each expert at sizes 2 and 4 (N=7168, 3584; commits below).
Keys are the token count M of the layer call; the nearest key is used, as vLLM does. Columns:
BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages.

Our gate/up launch carries two accumulators (gate and up, for the fused SiLU-and-multiply) where
vLLM's carries one over 2N columns: `launch_tiles` fits a row to the register and shared-memory
budget of each launch. `bench/tune_moe.py` measures candidates on the card at hand and prints a table
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


@dataclass(frozen=True, slots=True)
class LaunchTiles:
    block_n: int
    block_k: int
    num_stages: int


# fp32 accumulator registers per thread a launch may use (of 255), and bytes of shared memory its
# pipelined tiles may take (under the 227 KiB an H100/H200 block can use, leaving scratch room).
ACCUMULATOR_REGISTERS = 128
SHARED_MEMORY_BUDGET = 200 * 1024


def launch_tiles(cfg: TileConfig, gated: bool, element_size: int) -> LaunchTiles:
    """Fit a table row (tuned for vLLM's one-accumulator kernel) to one of our launches.

    The gated launch keeps two accumulators and two weight tiles per pipeline stage: BLOCK_N is
    halved until the accumulators fit the register budget (else they spill), then BLOCK_K is
    halved until two stages fit in shared memory, then stages are capped by what fits.
    """
    accumulators = 2 if gated else 1
    block_n, block_k = cfg.block_n, cfg.block_k
    threads = 32 * cfg.num_warps
    while accumulators * cfg.block_m * block_n > ACCUMULATOR_REGISTERS * threads and block_n > 32:
        block_n //= 2

    def stage_bytes() -> int:
        return (cfg.block_m * block_k + accumulators * block_k * block_n) * element_size

    while min(2, cfg.num_stages) * stage_bytes() > SHARED_MEMORY_BUDGET and block_k > 32:
        block_k //= 2
    stages = max(1, min(cfg.num_stages, SHARED_MEMORY_BUDGET // stage_bytes()))
    return LaunchTiles(block_n, block_k, stages)


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

# Tensor parallel: each rank holds a slice of every expert, so its layer is (E=8, N=14336/TP).
# vLLM's tables E=8,N=7168 (TP=2; H100 at vllm-project/vllm 02ba322, H200 at c6991a3) and
# E=8,N=3584 (TP=4; H100 at 702e0e2, H200 at b56f185).
_H100_TP2: dict[int, _Row] = {
    1: (16, 64, 128, 64, 4, 4),
    2: (16, 128, 128, 32, 8, 4),
    4: (16, 32, 256, 16, 4, 4),
    8: (16, 128, 128, 32, 8, 4),
    16: (16, 128, 128, 1, 4, 4),
    24: (16, 128, 128, 1, 4, 4),
    32: (16, 128, 128, 1, 4, 4),
    48: (32, 128, 128, 1, 4, 4),
    64: (32, 128, 128, 1, 4, 4),
    96: (32, 128, 128, 64, 4, 4),
    128: (64, 128, 128, 1, 4, 4),
    256: (64, 128, 128, 64, 4, 4),
    512: (64, 256, 64, 32, 4, 4),
    1024: (128, 256, 64, 16, 8, 4),
    1536: (128, 256, 64, 64, 8, 4),
    2048: (128, 256, 64, 32, 8, 4),
    3072: (128, 256, 64, 64, 8, 4),
    4096: (128, 256, 64, 16, 8, 4),
}

_H200_TP2: dict[int, _Row] = {
    1: (16, 128, 128, 64, 4, 5),
    2: (16, 128, 256, 16, 4, 3),
    4: (16, 128, 128, 32, 8, 4),
    8: (32, 128, 128, 1, 4, 3),
    16: (16, 128, 128, 16, 4, 5),
    24: (16, 64, 256, 16, 4, 3),
    32: (16, 128, 128, 1, 4, 5),
    48: (32, 128, 128, 1, 4, 5),
    64: (32, 128, 128, 1, 4, 4),
    96: (64, 128, 128, 1, 8, 4),
    128: (64, 128, 128, 1, 8, 4),
    256: (128, 256, 64, 1, 8, 4),
    512: (128, 256, 64, 32, 8, 4),
    1024: (128, 256, 64, 64, 8, 4),
    1536: (128, 256, 64, 16, 8, 4),
    2048: (128, 256, 64, 16, 8, 4),
    3072: (128, 256, 64, 64, 8, 4),
    4096: (128, 256, 64, 16, 8, 3),
}

_H100_TP4: dict[int, _Row] = {
    1: (16, 64, 256, 64, 4, 4),
    2: (16, 256, 64, 32, 4, 4),
    4: (16, 64, 256, 16, 4, 4),
    8: (16, 64, 128, 1, 4, 4),
    16: (16, 64, 128, 1, 4, 4),
    24: (16, 64, 128, 1, 4, 4),
    32: (16, 64, 128, 1, 4, 4),
    48: (32, 128, 128, 1, 4, 4),
    64: (32, 128, 128, 1, 4, 4),
    96: (32, 128, 128, 32, 4, 4),
    128: (64, 128, 128, 1, 4, 4),
    256: (128, 256, 64, 1, 8, 4),
    512: (64, 128, 64, 32, 4, 4),
    1024: (64, 256, 64, 64, 4, 4),
    1536: (128, 256, 64, 64, 8, 4),
    2048: (128, 256, 64, 64, 8, 4),
    3072: (128, 256, 64, 64, 8, 4),
    4096: (128, 256, 64, 1, 8, 4),
}

_H200_TP4: dict[int, _Row] = {
    1: (16, 128, 128, 16, 4, 5),
    2: (16, 128, 128, 1, 4, 3),
    4: (16, 64, 128, 16, 4, 5),
    8: (16, 64, 128, 16, 4, 5),
    16: (16, 128, 128, 32, 8, 3),
    24: (16, 128, 128, 1, 8, 3),
    32: (16, 128, 128, 1, 8, 3),
    48: (32, 128, 128, 1, 4, 3),
    64: (64, 128, 64, 64, 4, 4),
    96: (64, 128, 64, 1, 4, 4),
    128: (64, 64, 64, 1, 4, 3),
    256: (128, 256, 64, 32, 8, 4),
    512: (128, 256, 64, 16, 8, 4),
    1024: (128, 256, 64, 32, 8, 4),
    1536: (128, 256, 64, 16, 8, 4),
    2048: (128, 256, 64, 16, 8, 4),
    3072: (128, 256, 64, 32, 8, 4),
    4096: (128, 256, 64, 32, 8, 4),
}

# (experts, expert FFN size, GPU family as it appears in torch's device name) -> table: the
# shapes one rank's layer has. A family shares one table (an H100 PCIe starts from the SXM one's
# figures; retune with bench/tune_moe.py). Expert parallel gives a rank whole experts, (E=4 at
# EP=2, E=2 at EP=4, N=14336): vLLM publishes no table for those, so they start from the E=8
# table (each expert's GEMM has the same shape; what changes is how many experts share the
# tokens). They are seeds, not measurements.
TUNED: dict[tuple[int, int, str], dict[int, _Row]] = {
    (8, 14336, "H100"): _H100,
    (8, 14336, "H200"): _H200,
    (8, 7168, "H100"): _H100_TP2,
    (8, 7168, "H200"): _H200_TP2,
    (8, 3584, "H100"): _H100_TP4,
    (8, 3584, "H200"): _H200_TP4,
    (4, 14336, "H100"): _H100,
    (4, 14336, "H200"): _H200,
    (2, 14336, "H100"): _H100,
    (2, 14336, "H200"): _H200,
}


def tuned_table(num_experts: int, ffn_size: int, device_name: str) -> dict[int, _Row] | None:
    for (e, n, family), table in TUNED.items():
        if (e, n) == (num_experts, ffn_size) and family in device_name:
            return table
    return None


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
        table = tuned_table(num_experts, ffn_size, torch.cuda.get_device_name(device))
    if table is None:
        return default_config(num_tokens, num_experts)
    nearest = min(table, key=lambda m: abs(m - num_tokens))
    return TileConfig(*table[nearest])
