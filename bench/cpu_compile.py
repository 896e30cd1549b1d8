"""Does `torch.compile` speed up the CPU decode step? Eager against compiled, in one process.

    python -m bench.cpu_compile                      # batch 1 and 8, small checkpoint, bf16
    python -m bench.cpu_compile --batches 1,8,32 --rounds 9

The probe behind issue 19's decision on compiling the decode step on a CPU. Both sides run the
same decode forward plus LM head on the same weights and cache:

- **eager**: the engine's CPU path, every GEMM weight prepacked for oneDNN (`pack_for_cpu`);
- **compiled**: `torch.compile` (inductor, C++/OpenMP code generation) with `freezing`, so
  inductor packs attention's, the router's and the LM head's weights for oneDNN itself. Paged
  attention and the routed experts cannot be traced at a fixed shape (context lengths, expert
  counts read on the host), so they are opaque custom ops that read the layer's cache and step
  from a context, as vLLM's compiled graphs do; the experts inside them stay prepacked.

Rounds alternate eager and compiled, each the median of its steps; printed are each side's
median over rounds, the ratio, the compile time, and the largest logit difference (bf16). The
two cores are shared by nothing else: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.small_checkpoint import write_small_checkpoint
from model.backend import Routing
from model.batch import AttentionMetadata, BatchBuilder, SequenceChunk
from model.layers import apply_rotary
from model.loader import load_model
from model.mixtral import MixtralModel, allocate_kv_cache
from model.moe import route
from model.torch_backend.attention import decode_attention, write_kv
from model.torch_backend.moe import routed_experts

# What the opaque ops read: set before each compiled call (the "forward context").
_CONTEXT: dict[str, object] = {}


@torch.library.custom_op("bench_cpu_compile::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    kv_cache = _CONTEXT["kv_caches"][layer]  # type: ignore[index]
    meta: AttentionMetadata = _CONTEXT["meta"]  # type: ignore[assignment]
    write_kv(kv_cache, k, v, meta.slot_mapping)
    return decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, scale)


@_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("bench_cpu_compile::experts", mutates_args=())
def _experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, layer: int) -> torch.Tensor:
    model: MixtralModel = _CONTEXT["experts_model"]  # type: ignore[assignment]
    return routed_experts(x, Routing(ids, weights), model.layers[layer].ffn.expert_weights())


@_experts.register_fake
def _(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(x)


def decode_logits(model: MixtralModel, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`MixtralModel.forward` + `compute_logits` with attention and experts as opaque ops."""
    x = model.embed_tokens(input_ids)
    cos, sin = model.rotary(positions, x.dtype)
    num_tokens = x.shape[0]
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        q, k, v = attn.qkv_proj(layer.input_norm(x)).split(attn.split, dim=-1)
        q = q.view(num_tokens, attn.num_heads, attn.head_dim)
        k = k.view(num_tokens, attn.num_kv_heads, attn.head_dim)
        v = v.view(num_tokens, attn.num_kv_heads, attn.head_dim)
        q, k = apply_rotary(q, k, cos, sin)
        out = _attention(q, k, v, i, attn.scale)
        x = x + attn.o_proj(out.reshape(num_tokens, -1))
        h = layer.post_attn_norm(x)
        routing = route(layer.ffn.gate(h), layer.ffn.top_k)
        x = x + _experts(h, routing.topk_ids, routing.topk_weights, i)
    return model.lm_head(model.norm(x)).float()


def _median_step_ms(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=30, help="steps per side per round")
    p.add_argument("--context", type=int, default=64, help="tokens already in each sequence's cache")
    p.add_argument("--checkpoint", type=Path, help="another Mixtral checkpoint (`python -m model.demo moe`)")
    args = p.parse_args()
    torch.set_num_threads(2)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or write_small_checkpoint(Path(tmp) / "small")
        eager = load_model(path, dtype="bfloat16")
        eager.pack_for_cpu()
        compiled_model = load_model(path, dtype="bfloat16")
        for layer in compiled_model.layers:
            layer.ffn.pack_for_cpu()  # the experts the opaque op runs; the rest is inductor's
    name = args.checkpoint.name if args.checkpoint else "small checkpoint"
    print(f"# torch.compile probe: {name}, bf16, torch {torch.__version__}, 2 threads")
    print(f"# decode step + LM head, {args.context} tokens of context, median of {args.rounds} rounds")
    print()
    print("| batch | eager ms | compiled ms | eager / compiled | compile s | max logit diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in (int(b) for b in args.batches.split(",")):
        e, c, compile_s, diff = measure(eager, compiled_model, batch, args.context, args.rounds, args.steps)
        print(f"| {batch} | {e:.2f} | {c:.2f} | {e / c:.2f}x | {compile_s:.1f} | {diff:.3g} |")
        torch._dynamo.reset()


@torch.inference_mode()
def measure(
    eager: MixtralModel, compiled_model: MixtralModel, batch: int, context: int, rounds: int, steps: int
) -> tuple[float, float, float, float]:
    """(eager ms, compiled ms, compile s, max logit difference) of a decode step at `batch`."""
    block = 16
    blocks_per_seq = -(-(context + 1) // block)
    kv = allocate_kv_cache(eager.config, batch * blocks_per_seq, block, torch.bfloat16, "cpu")
    builder = BatchBuilder(512, 64, blocks_per_seq, block, torch.device("cpu"))
    chunks = [
        SequenceChunk([5], context, list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)))
        for i in range(batch)
    ]
    meta = builder.build(chunks).attn
    input_ids = torch.full((batch,), 5, dtype=torch.int64)
    _CONTEXT.update(kv_caches=kv, meta=meta, experts_model=compiled_model)
    compiled = torch.compile(lambda ids, pos: decode_logits(compiled_model, ids, pos))
    start = time.perf_counter()
    got = compiled(input_ids, meta.positions)
    compile_s = time.perf_counter() - start
    diff = (got - eager.compute_logits(eager(input_ids, kv, meta))).abs().max().item()

    def run_eager() -> None:
        eager.compute_logits(eager(input_ids, kv, meta))

    def run_compiled() -> None:
        compiled(input_ids, meta.positions)

    sides: dict[str, list[float]] = {"eager": [], "compiled": []}
    with torch.compiler.set_stance("fail_on_recompile"):  # a recompile would measure dynamo, not the step
        for _ in range(rounds):
            sides["eager"].append(_median_step_ms(run_eager, steps))
            sides["compiled"].append(_median_step_ms(run_compiled, steps))
    return statistics.median(sides["eager"]), statistics.median(sides["compiled"]), compile_s, diff


if __name__ == "__main__":
    main()
