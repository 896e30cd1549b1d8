"""How a model's heads, kv heads, experts and vocabulary are shared out over ranks."""

from __future__ import annotations

import dataclasses

import pytest

from model.config import ModelConfig, MoEConfig
from model.parallel import SINGLE, Parallel

MIXTRAL = ModelConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=32768,
    moe=MoEConfig(8, 2),
)  # fmt: skip


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_tensor_parallel_shares_cover_everything_once(size):
    ranks = [Parallel(r, size) for r in range(size)]
    for part, total in (("heads", 32), ("kv_heads", 8), ("ffn", 14336), ("vocab", 32000)):
        shares = [getattr(p, part)(total) for p in ranks]
        assert [i for s in shares for i in s] == list(range(total)), part
    assert all(p.experts(8) == range(8) for p in ranks)  # every rank holds a slice of every expert


def test_kv_heads_are_replicated_past_their_count():
    """2 kv heads over 4 ranks: ranks 0, 1 hold head 0 (their query heads read it), 2, 3 head 1."""
    assert [Parallel(r, 4).kv_heads(2) for r in range(4)] == [
        range(0, 1),
        range(0, 1),
        range(1, 2),
        range(1, 2),
    ]
    # Each rank's query heads read exactly the kv head it holds (grouped-query attention).
    for rank in range(4):
        p = Parallel(rank, 4)
        group = 8 // 2  # query heads per kv head, of 8 heads and 2 kv heads
        assert {h // group for h in p.heads(8)} == set(p.kv_heads(2))


def test_expert_parallel_gives_whole_experts():
    shares = [Parallel(r, 4, expert_parallel=True) for r in range(4)]
    assert [p.experts(8) for p in shares] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert all(p.ffn(14336) == range(14336) for p in shares)


def test_shapes_that_do_not_divide_are_refused_with_the_reason():
    for size in (1, 2, 4, 8):
        Parallel(0, size).check(MIXTRAL)
    Parallel(0, 8, expert_parallel=True).check(MIXTRAL)
    smollm = dataclasses.replace(MIXTRAL, num_heads=9, num_kv_heads=3, moe=None)
    with pytest.raises(ValueError, match="9 attention heads do not divide by 2; 3 kv heads"):
        Parallel(0, 2).check(smollm)
    with pytest.raises(ValueError, match="1 experts do not divide by 2"):
        Parallel(0, 2, expert_parallel=True).check(dataclasses.replace(MIXTRAL, moe=None))
    with pytest.raises(ValueError, match="not a rank"):
        Parallel(2, 2)
    assert SINGLE.heads(32) == range(32) and SINGLE.kv_heads(8) == range(8)
