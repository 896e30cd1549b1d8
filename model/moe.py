"""Feed-forward blocks: Mixtral's sparse MoE and the dense SwiGLU FFN, one module for both.

Experts are stored stacked: `w13 [E, 2F, D]` (gate rows first, then up, as vLLM and
transformers 5.x fuse them) and `w2 [E, D, F]`. A dense FFN is the same block with E = 1 and no
router, so a dense checkpoint and an upcycled MoE share every code path but routing. The routed
experts run on the layer's backend (`model.backend.Kernels`).

Shape legend: T tokens, A active experts per token (top-k), E experts, D hidden, F expert FFN.
"""

from __future__ import annotations

import torch
from torch import nn

from model.backend import ExpertWeights, Kernels, Routing, local_routing
from model.parallel import SINGLE, Parallel
from model.quant import WeightQuant, quantize_rows
from model.torch_backend.kernels import TORCH_KERNELS
from model.torch_backend.moe import expert_forward
from model.torch_backend.packed import PackedLinear


def route(router_logits: torch.Tensor, top_k: int) -> Routing:
    """Mixtral's rule: softmax over all experts (fp32), keep the top-k, renormalise them."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, A]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(topk_ids=ids, topk_weights=weights)


class FeedForward(nn.Module):
    """SwiGLU experts `[E, ...]` with a router when E > 1 (Mixtral), without one when dense.

    Expert weights are 16-bit, or 8-bit with per-output-channel scales after `quantize_`
    (`model.quant`). The routed experts run on `self.kernels`; a dense FFN always takes the torch
    path, and so do experts prepacked for the CPU (`pack_for_cpu`, only on the torch backend).

    Under tensor parallelism a rank holds a slice of every expert's FFN dimension; under expert
    parallelism, whole experts (`Parallel.experts`), the tokens routed to other ranks' experts
    dropped here. The router is whole on every rank, and the partial sums are all-reduced.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        num_experts: int = 1,
        top_k: int = 1,
        parallel: Parallel = SINGLE,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.local_experts = parallel.experts(num_experts)
        self.num_experts = len(self.local_experts)  # held here
        self.top_k = top_k
        local_ffn = len(parallel.ffn(ffn_size))
        self.w13 = nn.Parameter(torch.empty(self.num_experts, 2 * local_ffn, hidden_size))
        self.w2 = nn.Parameter(torch.empty(self.num_experts, hidden_size, local_ffn))
        self.w13_scale: nn.Parameter | None = None  # [E, 2F] fp32, 8-bit weights only
        self.w2_scale: nn.Parameter | None = None  # [E, D] fp32
        self.gate: nn.Module | None = None  # the router; a dense FFN has none
        if num_experts > 1:
            self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.kernels: Kernels = TORCH_KERNELS
        self._packed: tuple[tuple[nn.Module, nn.Module], ...] | None = None  # per expert (w13, w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        if self.gate is None:
            return self.parallel.all_reduce(expert_forward(self.expert_weights(), 0, x))
        routing = route(self.gate(x), self.top_k)
        if self.parallel.expert_parallel:
            routing = local_routing(routing, self.local_experts)
        return self.parallel.all_reduce(self.kernels.moe(x, routing, self.expert_weights()))

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.w13, self.w2, self.w13_scale, self.w2_scale, self._packed)

    @property
    def quant(self) -> WeightQuant:
        """How the experts are stored, read off their dtype."""
        return WeightQuant.from_dtype(self.w13.dtype)

    @torch.no_grad()
    def quantize_(self, scheme: WeightQuant) -> None:
        """Store the experts in 8 bits. On the meta device (before loading) the new storage is
        empty; elsewhere the current weights are quantized, one matrix at a time."""
        if scheme is WeightQuant.NONE:
            return
        for name in ("w13", "w2"):
            weight = getattr(self, name)
            if weight.is_meta:
                q = torch.empty(weight.shape, dtype=scheme.dtype, device=weight.device)
                scale = torch.empty(weight.shape[:-1], dtype=torch.float32, device=weight.device)
            else:
                q, scale = quantize_rows(weight, scheme)
            setattr(self, name, nn.Parameter(q, requires_grad=False))
            setattr(self, f"{name}_scale", nn.Parameter(scale, requires_grad=False))

    def pack_for_cpu(self) -> None:
        """Prepack each expert's weights for oneDNN and drop the dense copies (one-way; 16-bit
        only). Experts the native step packed already (`use_packed`) stay as they are."""
        if self.quant is not WeightQuant.NONE:
            return
        if isinstance(self.gate, nn.Linear):
            self.gate = PackedLinear(self.gate.weight)
        if self._packed is None:
            self.use_packed(
                tuple((PackedLinear(self.w13[e]), PackedLinear(self.w2[e])) for e in range(self.num_experts))
            )

    def use_packed(self, experts: tuple[tuple[nn.Module, nn.Module], ...]) -> None:
        """Run the experts on prepacked linear layers, per expert (w13, w2), and drop the dense
        weights (one-way)."""
        self._packed = experts
        self.w13 = nn.Parameter(torch.empty(0, dtype=self.w13.dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(0, dtype=self.w2.dtype), requires_grad=False)
