"""Grouped MoE dispatch against the per-expert reference loop, and the alignment contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from model.backend import Routing, align_to_experts
from model.moe import FeedForward, route
from model.torch_backend import moe as moe_path
from model.torch_backend.moe import grouped_swiglu

D, FF, E, A = 32, 48, 8, 2


def reference_moe(x: torch.Tensor, routing: Routing, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The per-expert loop (transformers' MixtralExperts.forward, written out)."""
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        tok, slot = torch.where(routing.topk_ids == e)
        if tok.numel() == 0:
            continue
        gate, up = F.linear(x[tok], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e]) * routing.topk_weights[tok, slot, None]
        out.index_add_(0, tok, y.to(x.dtype))
    return out


def weights(num_experts=E, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_experts, 2 * FF, D, generator=g) * 0.2, torch.randn(
        num_experts, D, FF, generator=g
    ) * 0.2


def routing_from(ids: torch.Tensor, seed=0) -> Routing:
    w = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) + 0.1
    return Routing(ids, w / w.sum(-1, keepdim=True))


@pytest.mark.parametrize("num_tokens", [1, 7, 64, 300])
def test_grouped_equals_loop_on_random_routing(num_tokens):
    x = torch.randn(num_tokens, D)
    w13, w2 = weights()
    routing = route(torch.randn(num_tokens, E), A)
    torch.testing.assert_close(grouped_swiglu(x, routing, w13, w2), reference_moe(x, routing, w13, w2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_one_token_gives_the_sorted_paths_bits(dtype, seed):
    """One token (a decode step at batch 1) skips the sort; it must give the sorted path's bits,
    so a batch's size alone does not change its numbers. Pairs routed to another rank's expert
    (id E, expert parallel) are left out by both."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, D, generator=g).to(dtype)
    w13, w2 = (w.to(dtype) for w in weights(seed=seed))
    routing = route(torch.randn(1, E, generator=g), A)
    held_elsewhere = Routing(routing.topk_ids[:, :1].repeat(1, 3), torch.tensor([[0.5, 0.0, 0.0]]))
    held_elsewhere.topk_ids[0, 1:] = E
    for r in (routing, held_elsewhere):

        def expert(e, xs):
            return F.linear(moe_path.silu_and_mul(F.linear(xs, w13[e])), w2[e])

        one = grouped_swiglu(x, r, w13, w2)
        assert torch.equal(one, moe_path._sorted_pairs(x, r, E, expert))
        torch.testing.assert_close(
            one.float(), reference_moe(x.float(), r, w13.float(), w2.float()), atol=1e-2, rtol=1e-2
        )


def test_all_tokens_on_one_expert_and_empty_experts():
    num_tokens = 37
    x = torch.randn(num_tokens, D)
    w13, w2 = weights()
    ids = torch.stack(
        [torch.full((num_tokens,), 5), torch.full((num_tokens,), 2)], dim=1
    )  # experts 0,1,3,4,6,7 idle
    routing = routing_from(ids)
    torch.testing.assert_close(grouped_swiglu(x, routing, w13, w2), reference_moe(x, routing, w13, w2))
    ids = torch.full((num_tokens, 1), 7)  # top-1, everything on the last expert
    routing = routing_from(ids)
    torch.testing.assert_close(grouped_swiglu(x, routing, w13, w2), reference_moe(x, routing, w13, w2))


def test_router_is_mixtrals_rule():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 3.0, 0.0, 0.0]])
    r = route(logits, 2)
    probs = logits.softmax(-1)
    assert r.topk_ids[0].tolist() == [1, 2]
    torch.testing.assert_close(r.topk_weights[0], probs[0, [1, 2]] / probs[0, [1, 2]].sum())
    torch.testing.assert_close(r.topk_weights.sum(-1), torch.ones(2))


def test_dense_block_is_a_single_expert_without_router():
    ffn = FeedForward(D, FF, num_experts=1)
    assert ffn.gate is None
    w13, w2 = weights(num_experts=1)
    ffn.w13.data.copy_(w13)
    ffn.w2.data.copy_(w2)
    x = torch.randn(5, D)
    ids = torch.zeros(5, 1, dtype=torch.long)
    torch.testing.assert_close(ffn(x), reference_moe(x, routing_from(ids), w13, w2))


@settings(max_examples=60, deadline=None)
@given(
    num_tokens=st.integers(1, 40),
    top_k=st.integers(1, 3),
    num_experts=st.integers(3, 9),
    tile=st.sampled_from([1, 2, 4, 16]),
    data=st.data(),
)
def test_align_to_experts_contract(num_tokens, top_k, num_experts, tile, data):
    """vLLM's moe_align_block_size contract: every pair once, grouped by expert, tiles single-expert."""
    ids = torch.tensor(
        data.draw(st.lists(st.lists(st.integers(0, num_experts - 1), min_size=top_k, max_size=top_k),
                           min_size=num_tokens, max_size=num_tokens))
    )  # fmt: skip
    d = align_to_experts(ids, num_experts, tile)
    pairs = num_tokens * top_k
    flat = ids.flatten()
    n = int(d.num_padded)
    assert n % tile == 0 and d.sorted_pair_ids.numel() % tile == 0
    assert d.sorted_pair_ids.numel() >= n
    used = d.sorted_pair_ids[:n]
    real = used[used < pairs]
    assert sorted(real.tolist()) == list(range(pairs))  # every pair exactly once
    assert (d.sorted_pair_ids[n:] == pairs).all()  # nothing real past the padded count
    assert d.expert_counts.tolist() == torch.bincount(flat, minlength=num_experts).tolist()
    for t in range(n // tile):
        tile_ids = used[t * tile : (t + 1) * tile]
        tile_real = tile_ids[tile_ids < pairs]
        assert (flat[tile_real] == d.tile_expert_ids[t]).all()  # one expert per tile
    experts_in_order = flat[real]
    assert (experts_in_order[1:] >= experts_in_order[:-1]).all()  # grouped in expert order
    assert n == sum(-(-c // tile) * tile for c in d.expert_counts.tolist())
