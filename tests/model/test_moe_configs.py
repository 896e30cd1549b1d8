"""The fused MoE's tile tables: lookup by GPU family and token count, and fitting each launch."""

from __future__ import annotations

import pytest
import torch

from model.triton_backend.moe_configs import (
    ACCUMULATOR_REGISTERS,
    SHARED_MEMORY_BUDGET,
    TUNED,
    TileConfig,
    launch_tiles,
    moe_tile_config,
    tuned_table,
)

ROWS = [(family, m, TileConfig(*row)) for (_, _, family), table in TUNED.items() for m, row in table.items()]


@pytest.mark.parametrize(("family", "m", "cfg"), ROWS, ids=[f"{f}-{m}" for f, m, _ in ROWS])
@pytest.mark.parametrize("gated", [True, False], ids=["gate_up", "down"])
@pytest.mark.parametrize("element_size", [2, 1], ids=["bf16", "8bit"])
def test_every_row_fits_registers_and_shared_memory(family, m, cfg, gated, element_size):
    tiles = launch_tiles(cfg, gated, element_size)
    accumulators = 2 if gated else 1
    assert accumulators * cfg.block_m * tiles.block_n <= ACCUMULATOR_REGISTERS * 32 * cfg.num_warps
    per_stage = (cfg.block_m * tiles.block_k + accumulators * tiles.block_k * tiles.block_n) * element_size
    assert tiles.num_stages * per_stage <= SHARED_MEMORY_BUDGET
    assert tiles.num_stages >= min(2, cfg.num_stages)  # software pipelining kept
    assert tiles.block_n <= cfg.block_n and tiles.block_k <= cfg.block_k
    if (
        not gated
        and element_size == 2
        and cfg.block_n * cfg.block_m <= ACCUMULATOR_REGISTERS * 32 * cfg.num_warps
    ):
        assert (tiles.block_n, tiles.block_k) == (cfg.block_n, cfg.block_k)  # vLLM's own launch: as tuned


def test_table_lookup_by_family_and_nearest_token_count():
    assert tuned_table(8, 14336, "NVIDIA H100 80GB HBM3") is TUNED[(8, 14336, "H100")]
    assert tuned_table(8, 14336, "NVIDIA H100 PCIe") is TUNED[(8, 14336, "H100")]
    assert tuned_table(8, 14336, "NVIDIA H200") is TUNED[(8, 14336, "H200")]
    # One rank's layer under tensor parallelism (a slice of each expert) and expert parallelism.
    assert tuned_table(8, 7168, "NVIDIA H100 80GB HBM3") is TUNED[(8, 7168, "H100")]
    assert tuned_table(8, 3584, "NVIDIA H200") is TUNED[(8, 3584, "H200")]
    assert tuned_table(4, 14336, "NVIDIA H200") is TUNED[(8, 14336, "H200")]  # EP=2: seeded from E=8
    assert tuned_table(8, 14336, "NVIDIA A100-SXM4-80GB") is None
    assert tuned_table(8, 4096, "NVIDIA H100 80GB HBM3") is None  # another model's shapes
    # On CPU (the interpreter) the untuned default applies, by token count.
    assert moe_tile_config(8, 14336, 4, torch.device("cpu")).block_m == 16
    assert moe_tile_config(8, 14336, 300, torch.device("cpu")).block_m == 64
