"""Sharded loading: each rank holds its 1/N of the weights, counted in its own process."""

from __future__ import annotations

import pytest

from bench.small_checkpoint import write_small_checkpoint
from engine.config import EngineArgs
from engine.factory import build_engine
from model.config import load_config
from tokenization.loader import load_prompt_encoder

# What a fresh worker's own resident memory (RssAnon) grows by at load besides its weights: the
# transient slices read from the file, which the allocator keeps (measured: 37 MB at N = 2 and 4).
FIXED_RSS = 64e6


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """PERFORMANCE.md's "small" random Mixtral (139M parameters, 278 MB in bf16)."""
    return write_small_checkpoint(tmp_path_factory.mktemp("small") / "small")


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_loads_its_share(small_dir, tp):
    total = load_config(small_dir).num_parameters() * 2  # bf16
    args = EngineArgs(max_model_len=256, kv_cache_memory_gb=0.01, max_num_seqs=4, tensor_parallel_size=tp)
    engine, _ = build_engine(small_dir, args, load_prompt_encoder(small_dir))
    try:
        shares = engine.workers.shares
    finally:
        engine.close()
    assert len(shares) == tp
    print(f"TP={tp}: {total / 1e6:.0f} MB in all;", ", ".join(
        f"rank {r}: {s.weights_bytes / 1e6:.1f} MB of parameters, RSS +{s.load_rss_bytes / 1e6:.1f} MB"
        for r, s in enumerate(shares)
    ))  # fmt: skip
    for rank, share in enumerate(shares):
        # The router and the norms are whole on every rank: noise next to the rest.
        assert share.weights_bytes == pytest.approx(total / tp, rel=0.1), rank
    for rank, share in enumerate(shares[1:], start=1):
        # Counted in each worker's own (fresh) process: its resident memory grew by its share and
        # a constant (FIXED_RSS), never by the whole. Rank 0 is this test process, whose
        # allocator already holds pages freed by the checkpoint's writing: its growth says nothing.
        assert 0.9 * share.weights_bytes < share.load_rss_bytes < share.weights_bytes + FIXED_RSS, rank
        assert share.load_rss_bytes < 0.75 * total
