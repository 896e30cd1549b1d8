"""The fused MoE kernel equals the torch path: routings, tiles, dtypes, 8-bit weights."""

from __future__ import annotations

import pytest
import torch

from model.backend import ExpertWeights, Routing, local_routing
from model.moe import route
from model.quant import WeightQuant, quantize_rows
from model.torch_backend.moe import grouped_swiglu, routed_experts
from model.triton_backend.fused_moe import fused_moe
from model.triton_backend.moe_configs import TileConfig
from tests.kernels.conftest import DEVICE, FP32_TOL, UPCAST

E, D, F = 4, 80, 96  # D = 80: the K loop ends on a partial tile for every BLOCK_K tried

TILES = {
    "default": None,
    "m16-n32-k32": TileConfig(16, 32, 32, 1),
    "m32-n64-k16-grouped": TileConfig(32, 64, 16, 4),
    "m16-n256-k64": TileConfig(16, 256, 64, 2),  # gate/up runs at BLOCK_N 128 with two accumulators
}


def weights(dtype=torch.float32):
    w13 = torch.randn(E, 2 * F, D, device=DEVICE) * 0.1
    w2 = torch.randn(E, D, F, device=DEVICE) * 0.1
    return w13.to(dtype), w2.to(dtype)


def routing_of(ids: list[list[int]]) -> Routing:
    ids_t = torch.tensor(ids, device=DEVICE)
    w = torch.rand(ids_t.shape, device=DEVICE) + 0.1
    return Routing(ids_t, w / w.sum(-1, keepdim=True))


@pytest.mark.parametrize("tiles", TILES.values(), ids=TILES.keys())
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
def test_random_routing_matches_torch(num_tokens, tiles):
    x = torch.randn(num_tokens, D, device=DEVICE)
    w13, w2 = weights()
    routing = route(torch.randn(num_tokens, E, device=DEVICE), 2)
    out = fused_moe(x, routing, w13, w2, config=tiles, upcast=UPCAST)
    torch.testing.assert_close(out, grouped_swiglu(x, routing, w13, w2), **FP32_TOL)


ROUTINGS = {
    "expert-3-unused": [[0, 1], [1, 2], [2, 0], [0, 2], [1, 0]],
    "all-on-two-experts": [[1, 2]] * 9,
    "top1-all-on-one": [[2]] * 17,
    "top1-one-token-each-expert": [[0], [1], [2], [3]],
}


@pytest.mark.parametrize("ids", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_skewed_routings(ids):
    routing = routing_of(ids)
    x = torch.randn(len(ids), D, device=DEVICE)
    w13, w2 = weights()
    out = fused_moe(x, routing, w13, w2, config=TileConfig(16, 32, 32), upcast=UPCAST)
    torch.testing.assert_close(out, grouped_swiglu(x, routing, w13, w2), **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs(dtype):
    """fp16 dots run as they are; bf16 with fp32 dots under the interpreter (its bf16 dot is wrong)."""
    x = torch.randn(21, D, device=DEVICE)
    w13, w2 = weights()
    routing = route(torch.randn(21, E, device=DEVICE), 2)
    ref = grouped_swiglu(x, routing, w13, w2)  # fp32 reference
    out = fused_moe(
        x.to(dtype), routing, w13.to(dtype), w2.to(dtype), upcast=UPCAST and dtype == torch.bfloat16
    )
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert ((out.float() - ref).norm() / ref.norm()) < 8 * eps


@pytest.mark.parametrize("scheme", [WeightQuant.INT8, WeightQuant.FP8], ids=lambda s: s.value)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_8_bit_weights_match_the_torch_path(scheme, dtype):
    x = torch.randn(19, D, device=DEVICE).to(dtype)
    w13, w2 = weights()
    (q13, s13), (q2, s2) = quantize_rows(w13, scheme), quantize_rows(w2, scheme)
    routing = route(torch.randn(19, E, device=DEVICE), 2)
    out = fused_moe(x, routing, q13, q2, s13, s2, config=TileConfig(16, 32, 32), upcast=UPCAST)
    # The torch path on the same 8-bit weights in fp32: the kernel computes the same product.
    ref_q = routed_experts(x.float(), routing, ExpertWeights(q13, q2, s13, s2))
    eps = torch.finfo(dtype).eps
    assert ((out.float() - ref_q).norm() / ref_q.norm()) < max(8 * eps, FP32_TOL["rtol"])
    # And against the 16-bit weights, within the quantization error (see tests/model/test_quant.py).
    ref = grouped_swiglu(x.float(), routing, w13, w2)
    assert ((out.float() - ref).norm() / ref.norm()) < (0.02 if scheme is WeightQuant.INT8 else 0.06)


def test_rejects_half_quantized_weights():
    w13, w2 = weights()
    q13, s13 = quantize_rows(w13, WeightQuant.INT8)
    with pytest.raises(ValueError, match="together"):
        fused_moe(
            torch.randn(2, D, device=DEVICE), route(torch.randn(2, E, device=DEVICE), 2), q13, w2, s13, None
        )


@pytest.mark.parametrize("held", [range(0, 2), range(2, 4), range(3, 4)], ids=str)
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_expert_parallel_share(num_tokens, held):
    """A rank holding only `held` of the experts (expert parallel): pairs routed elsewhere come
    out as zeros, and the held experts' part equals the torch path's and the whole layer's share."""
    x = torch.randn(num_tokens, D, device=DEVICE)
    w13, w2 = weights()
    full = route(torch.randn(num_tokens, E, device=DEVICE), 2)
    local = local_routing(full, held)
    part = slice(held.start, held.stop)
    out = fused_moe(x, local, w13[part].contiguous(), w2[part].contiguous(), upcast=UPCAST)
    torch.testing.assert_close(out, grouped_swiglu(x, local, w13[part], w2[part]), **FP32_TOL)
    shares = [
        grouped_swiglu(x, local_routing(full, r), w13[r.start : r.stop], w2[r.start : r.stop])
        for r in (range(0, held.start), held, range(held.stop, E))
        if len(r)
    ]
    torch.testing.assert_close(sum(shares), grouped_swiglu(x, full, w13, w2), **FP32_TOL)
