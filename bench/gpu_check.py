"""GPU check: the Triton kernels and CUDA-graph replay against the eager torch path, then speed.

    python3 bench/gpu_check.py                    # on a CUDA GPU, under 4 minutes
    python3 bench/gpu_check.py --json out.json    # also write the figures as JSON
    TRITON_INTERPRET=1 python3 bench/gpu_check.py --smoke   # tiny shapes on CPU (what CI runs)

Imports only torch, triton and our model package (the GPU machine has no web stack). On random
weights with Mixtral 8x7B's exact layer shapes (hidden 4096, experts 8 x 14336, 32/8 heads of
128, vocab 32000) and as many layers as fit most of the card, it:
1. prints versions and measures the card's copy bandwidth and bf16 GEMM rate (the ceilings);
2. checks, in bf16: fused MoE vs the torch experts (16-bit and 8-bit weights), paged attention
   (decodes + a prefill chunk) vs torch, a whole decode step Triton vs torch, and CUDA-graph
   replay vs the eager Triton step;
3. times decode steps at batch 1, 8, 32, 128 (context 512 each) on the torch path, Triton
   eager and Triton with CUDA graphs, and a 2048-token prefill on both paths; each as tokens/s
   and as a fraction of its ceiling: decode = bytes the step must read (weights of the experts
   actually routed to, attention, head, KV) / measured copy bandwidth; prefill = FLOPs / GEMM rate;
4. the same decode timings with 8-bit experts (fp8 e4m3 on Hopper, int8 elsewhere);
5. decode attention alone over 32k-token contexts at batch 1 and 8, one pass per (sequence, kv
   head) vs split-KV, checked against torch and as a fraction of the bandwidth ceiling;
6. tensor parallel (`bench/tp_check.py`): two layers split over two ranks, NCCL when the machine
   has two GPUs, else gloo on the one GPU (the per-rank Triton shapes), against one rank.
Timing: CUDA events after warm-up, median of repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from model.backend import ExpertWeights  # noqa: E402
from model.batch import AttentionMetadata, BatchBuilder, SequenceChunk  # noqa: E402
from model.config import ModelConfig, MoEConfig  # noqa: E402
from model.cuda_graphs import DecodeGraphs  # noqa: E402
from model.mixtral import MixtralModel, allocate_kv_cache  # noqa: E402
from model.moe import route  # noqa: E402
from model.quant import WeightQuant, quantize_rows, resolve_quant  # noqa: E402
from model.torch_backend.attention import decode_attention as torch_decode_attention  # noqa: E402
from model.torch_backend.kernels import TORCH_KERNELS  # noqa: E402
from model.torch_backend.moe import routed_experts  # noqa: E402
from model.triton_backend import paged_attention  # noqa: E402
from model.triton_backend.kernels import TritonKernels  # noqa: E402
from model.triton_backend.moe_configs import tuned_table  # noqa: E402

BLOCK = 16
GB = 1e9
CHECK_DECODES = 8  # the correctness checks' mixed step: 8 decodes,
CHECK_CHUNK = (20, 40)  # then a 40-token chunk after 20 cached tokens


@dataclass(frozen=True)
class Plan:
    config: ModelConfig
    decode_batches: tuple[int, ...]
    context: int  # tokens already cached per decoding sequence
    prefill_tokens: int
    repeats: int
    graphs: bool

    @property
    def blocks_per_decode(self) -> int:
        return -(-(self.context + 1) // BLOCK)

    @property
    def max_seqs(self) -> int:
        return max(*self.decode_batches, CHECK_DECODES + 1)

    @property
    def max_blocks_per_seq(self) -> int:
        return max(
            self.blocks_per_decode, -(-max(self.prefill_tokens, CHECK_CHUNK[0] + CHECK_CHUNK[1]) // BLOCK)
        )

    @property
    def kv_blocks(self) -> int:
        """Disjoint blocks for the largest decode batch, then for one prefill (or checked chunk)."""
        return self.max_seqs * self.blocks_per_decode + self.max_blocks_per_seq


def mixtral_layer_config(num_layers: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=num_layers, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=32768,
        moe=MoEConfig(8, 2),
    )  # fmt: skip


def smoke_plan() -> Plan:
    config = ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=1024, moe=MoEConfig(8, 2),
    )  # fmt: skip
    return Plan(config, (1, 4), 40, 48, 1, graphs=False)


def gpu_plan(device: torch.device, layers: int | None) -> Plan:
    batches, context, prefill = (1, 8, 32, 128), 512, 2048
    one = mixtral_layer_config(1)
    layer_bytes = (one.num_parameters() - 2 * one.vocab_size * one.hidden_size) * 2
    kv_bytes = Plan(one, batches, context, prefill, 0, True).kv_blocks * BLOCK * 2 * 8 * 128 * 2  # a layer
    if layers is None:
        free = torch.cuda.mem_get_info(device)[0]
        headroom = 10 * GB  # activations of the torch path at 2k tokens, graphs, the CUDA context
        layers = int((free - headroom - 2 * one.vocab_size * one.hidden_size * 2) // (layer_bytes + kv_bytes))
        layers = max(1, min(32, layers))
    return Plan(mixtral_layer_config(layers), batches, context, prefill, 10, graphs=True)


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
        """Median seconds of `fn`."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def ceilings(device: torch.device, timer: Timer, smoke: bool) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 GEMM FLOP/s), measured."""
    n = 1 << (20 if smoke else 30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), 3 if smoke else 20)
    m = 256 if smoke else 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    t_mm = timer(lambda: a @ a, 2 if smoke else 10)
    return 2 * n / t, 2 * m**3 / t_mm


@torch.no_grad()
def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> MixtralModel:
    with torch.device("meta"):
        model = MixtralModel(config).to(dtype)
    model.to_empty(device=device)
    model.rotary.reset_cache()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02 if "gate" not in name else 1.0)  # a peaked router: few near-ties
        p.requires_grad_(False)
    return model.eval()


def decode_chunks(plan: Plan, batch: int) -> list[SequenceChunk]:
    """`batch` sequences of plan.context cached tokens, one new token each, in disjoint blocks."""
    n, vocab = plan.blocks_per_decode, plan.config.vocab_size
    return [
        SequenceChunk([(7 * i + 3) % vocab], plan.context, list(range(i * n, (i + 1) * n)))
        for i in range(batch)
    ]


def chunk_after_decodes(plan: Plan, cached: int, tokens: int) -> SequenceChunk:
    """A prefill chunk in the blocks past those of the largest decode batch."""
    first = plan.max_seqs * plan.blocks_per_decode
    blocks = list(range(first, first + -(-(cached + tokens) // BLOCK)))
    return SequenceChunk([(5 * i + 1) % plan.config.vocab_size for i in range(tokens)], cached, blocks)


def build(builder: BatchBuilder, chunks: list[SequenceChunk]) -> tuple[torch.Tensor, AttentionMetadata]:
    """Input ids and metadata; valid until the builder's next build (it reuses its buffers)."""
    b = builder.build(chunks)
    return b.input_ids, b.attn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


class Check:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, name: str, err: float, bound: float) -> None:
        ok = err <= bound
        print(
            f"  {'ok  ' if ok else 'FAIL'} {name}: relative error {err:.2e} (bound {bound:.0e})", flush=True
        )
        if not ok:
            self.failures.append(name)


def long_context_attention(
    device: torch.device, timer: Timer, bandwidth: float, check: Check, smoke: bool
) -> list[dict]:
    """Decode attention alone over long contexts: one pass per (sequence, kv head), then the
    split count `decode_attention` picks for this launch (4 in the smoke run, which has one SM)."""
    heads, kv_heads, head_dim = (4, 2, 16) if smoke else (32, 8, 128)
    context, batches, repeats = (300, (1, 2), 1) if smoke else (32768, (1, 8), 20)
    blocks = -(-context // BLOCK)
    dtype = torch.bfloat16
    cache = torch.randn(2, max(batches) * blocks, BLOCK, kv_heads, head_dim, device=device, dtype=dtype)
    scale = head_dim**-0.5
    sms = paged_attention.sm_count(device)
    print(f"decode attention alone, {context}-token contexts (bf16):")
    print("  | batch | splits | ms | bytes to read | of bandwidth ceiling |")
    rows = []
    for batch in batches:
        tables = torch.arange(batch * blocks, device=device).view(batch, blocks)
        lens = torch.full((batch,), context, device=device)
        q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
        auto = 4 if smoke else paged_attention.decode_splits(batch, kv_heads, blocks, sms)

        def attend(splits: int, q=q, tables=tables, lens=lens) -> torch.Tensor:
            return paged_attention.decode_attention(
                q, cache, tables, lens, scale, upcast=smoke, num_splits=splits
            )

        if batch == 1:
            expected = torch_decode_attention(q.float(), cache[:, :blocks].float(), tables, lens, scale)
            for splits in sorted({1, auto}):
                check(
                    f"decode attention, {context} tokens, {splits} split(s)",
                    rel_err(attend(splits), expected),
                    2e-2,
                )
        nbytes = batch * context * 2 * kv_heads * head_dim * dtype.itemsize
        for splits in sorted({1, auto}):
            t = timer(lambda splits=splits: attend(splits), repeats)
            rows.append({"batch": batch, "splits": splits, "seconds": t, "bytes": nbytes})
            cells = (
                f"{batch} | {splits} | {t * 1e3:.3f} | {nbytes / GB:.2f} GB | {nbytes / bandwidth / t:.0%}"
            )
            print(f"  | {cells} |", flush=True)
    return rows


def step_bytes(
    model: MixtralModel,
    input_ids,
    kv,
    meta,
    kv_tokens: int,
    expert_bytes_per_weight: float,
    dense_bytes_per_weight: float = 2,
) -> int:
    """Bytes a forward must read: attention/router/norm weights, routed-to experts, head rows, KV.
    `dense_bytes_per_weight`: of attention's projections and the LM head (1 under CPU int8)."""
    cfg = model.config
    d, f = cfg.hidden_size, cfg.intermediate_size
    touched = []
    hooks = [
        layer.ffn.gate.register_forward_hook(
            lambda _m, _i, out, k=cfg.moe.top_k: touched.append(out.topk(k, dim=-1).indices.unique().numel())
        )
        for layer in model.layers
    ]
    model(input_ids, kv, meta)
    for h in hooks:
        h.remove()
    attn = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + d * cfg.moe.num_experts + 2 * d
    per_expert = 3 * d * f * expert_bytes_per_weight
    router_and_norms = d * cfg.moe.num_experts + 2 * d
    dense = (attn - router_and_norms) * dense_bytes_per_weight + router_and_norms * 2
    weights = cfg.num_layers * dense + sum(touched) * per_expert + cfg.vocab_size * d * dense_bytes_per_weight
    kv_bytes = kv_tokens * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    return int(weights + kv_bytes)


def step_flops(cfg: ModelConfig, tokens: int) -> float:
    """GEMM FLOPs of a causal prefill of `tokens` (top-k experts per token, attention, head once)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    proj = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + d * cfg.moe.num_experts
    per_token = cfg.num_layers * (proj + cfg.moe.top_k * 3 * d * f)
    attention = (
        cfg.num_layers * 2 * cfg.num_heads * cfg.head_dim * tokens * tokens
    )  # QK^T and PV, causal half
    return 2.0 * per_token * tokens + attention + 2.0 * d * cfg.vocab_size


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--layers", type=int, help="decoder layers (default: as many as fit most of the card)")
    ap.add_argument("--skip-8bit", action="store_true")
    ap.add_argument("--skip-tp", action="store_true", help="no tensor-parallel section (bench/tp_check.py)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    started = time.monotonic()
    torch.manual_seed(0)

    import triton

    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke under TRITON_INTERPRET=1 on CPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"torch {torch.__version__}, triton {triton.__version__}, device: {name}", flush=True)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        capability = torch.cuda.get_device_capability(device)
        print(f"  capability {capability}, memory {total / GB:.1f} GB ({free / GB:.1f} free)")
    timer = Timer(device)
    bandwidth, flop_rate = ceilings(device, timer, args.smoke)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the probes' buffers back before sizing the model
    print(f"  measured: copy {bandwidth / 1e12:.2f} TB/s (read + write), ", end="")
    print(f"bf16 GEMM {flop_rate / 1e12:.0f} TFLOP/s")

    check = Check()
    long_context = long_context_attention(device, timer, bandwidth, check, args.smoke)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    plan = smoke_plan() if args.smoke else gpu_plan(device, args.layers)
    cfg = plan.config
    dtype = torch.bfloat16
    triton_kernels = TritonKernels(upcast=device.type == "cpu")
    model = random_model(cfg, device, dtype)
    kv = allocate_kv_cache(cfg, plan.kv_blocks, BLOCK, dtype, device)
    max_tokens = max(plan.prefill_tokens, plan.max_seqs + sum(CHECK_CHUNK))
    builder = BatchBuilder(max_tokens, plan.max_seqs, plan.max_blocks_per_seq, BLOCK, device)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / GB
    kv_gb = kv.numel() * kv.element_size() / GB
    print(f"model: {cfg.num_layers} Mixtral 8x7B layers, {weights_gb:.1f} GB of bf16 weights; ", end="")
    print(f"KV pool {kv_gb:.1f} GB")

    table = tuned_table(cfg.moe.num_experts, cfg.intermediate_size, name)
    print(f"fused MoE tiles: {'the tuned table for this GPU family' if table else 'the untuned default'}")

    print("correctness (bf16, Triton vs torch on the same weights):", flush=True)
    check_kernels(model, kv, builder, plan, triton_kernels, check, device)

    results: dict[str, object] = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "layers": cfg.num_layers,
        "copy_bandwidth": bandwidth,
        "gemm_flops": flop_rate,
        "long_context_attention": long_context,
    }
    print("speed (bf16):", flush=True)
    ceiling = (bandwidth, flop_rate)
    results["bf16"] = measure(model, kv, builder, plan, triton_kernels, timer, ceiling, 2.0)

    if not args.skip_8bit:
        scheme = resolve_quant("8bit", device)
        model.quantize_experts_(scheme)  # one matrix at a time: no second 16-bit copy
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"speed ({scheme.value} experts, bf16 activations):", flush=True)
        results[scheme.value] = measure(model, kv, builder, plan, triton_kernels, timer, ceiling, 1.0, False)

    print_targets(results["bf16"])
    if not args.skip_tp:
        del model, kv
        if device.type == "cuda":
            torch.cuda.empty_cache()
        from bench import tp_check  # the tensor-parallel section; it imports this module's helpers

        results["tp"] = tp_check.run(args.smoke, 2, check)
    results["failures"] = check.failures
    results["seconds"] = time.monotonic() - started
    print(f"done in {results['seconds']:.0f} s; {len(check.failures)} check(s) failed {check.failures or ''}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if check.failures else 0


def print_targets(bf16: dict) -> None:
    """The issue's targets: batch-1 decode with graphs >= 70% of the bandwidth ceiling; MoE 2x at 32."""
    print("targets (bf16):")
    step = bf16.get("decode_1", {}).get("triton+graphs")
    if step:
        frac = step["fraction"]
        print(f"  decode at batch 1, CUDA graphs: {frac:.0%} of the bandwidth ceiling (target >= 70%)")
    moe = bf16["moe"].get(32)
    if moe:
        print(f"  Triton MoE vs the torch path at 32 tokens: {moe['speedup']:.2f}x (target >= 2x)")


def quantized(w: ExpertWeights, scheme: WeightQuant) -> ExpertWeights:
    (q13, s13), (q2, s2) = quantize_rows(w.w13, scheme), quantize_rows(w.w2, scheme)
    return ExpertWeights(q13, q2, s13, s2)


def check_kernels(model, kv, builder, plan, triton_kernels, check: Check, device) -> None:
    cfg = model.config
    layer = model.layers[0]
    token_counts = (1, 32, 512 if device.type == "cuda" else 24)
    inputs = []
    for tokens in token_counts:
        x = torch.randn(tokens, cfg.hidden_size, device=device, dtype=torch.bfloat16)
        # Random router logits of unit scale: both experts of a token get real weight.
        inputs.append((x, route(torch.randn(tokens, cfg.moe.num_experts, device=device), cfg.moe.top_k)))
    w = layer.ffn.expert_weights()
    for label, weights in [
        ("", w),
        *((f" {s.value}", quantized(w, s)) for s in (WeightQuant.INT8, WeightQuant.FP8)),
    ]:
        for x, routing in inputs:
            ref = routed_experts(x, routing, weights)
            err = rel_err(triton_kernels.moe(x, routing, weights), ref)
            check(f"fused MoE{label}, {x.shape[0]} tokens", err, 2e-2)
        del weights

    # Attention over a mixed step: decodes with context, then a prefill chunk after cached tokens.
    kv.normal_()
    _, mixed = build(builder, decode_chunks(plan, CHECK_DECODES) + [chunk_after_decodes(plan, *CHECK_CHUNK)])
    q = torch.randn(mixed.num_tokens, cfg.num_heads, cfg.head_dim, device=device, dtype=torch.bfloat16)
    scale = cfg.head_dim**-0.5
    ref = TORCH_KERNELS.attention(q, kv[0], mixed, scale)
    check(
        f"paged attention ({CHECK_DECODES} decodes + a {CHECK_CHUNK[1]}-token chunk)",
        rel_err(triton_kernels.attention(q, kv[0], mixed, scale), ref),
        2e-2,
    )

    # A whole decode step, and its CUDA-graph replay.
    kv.zero_()
    ids, meta = build(builder, decode_chunks(plan, CHECK_DECODES))
    model.use_kernels(TORCH_KERNELS)
    h_torch = model(ids, kv, meta)
    model.use_kernels(triton_kernels)
    h_triton = model(ids, kv, meta)
    # bf16 rounding differs between the paths, and a near-tie in some router may flip one token's
    # expert choice: judge the median token, and say how many tokens diverged.
    per_token = sorted(rel_err(a, b) for a, b in zip(h_triton, h_torch, strict=True))
    diverged = sum(e > 5e-2 for e in per_token)
    print(f"  decode step: {diverged} of {CHECK_DECODES} tokens beyond 5e-2 (one may be a router near-tie)")
    check(f"decode step, {CHECK_DECODES} sequences (median token)", per_token[len(per_token) // 2], 5e-2)
    if plan.graphs:
        graphs = DecodeGraphs(model, kv, builder.max_blocks_per_seq, [CHECK_DECODES])
        graphs.capture()
        h_graph = graphs.run(ids, meta)
        check("CUDA graph replay vs eager Triton step", rel_err(h_graph, h_triton), 1e-3)
        del graphs


def moe_speed(
    model: MixtralModel,
    plan: Plan,
    triton_kernels: TritonKernels,
    timer: Timer,
    bandwidth: float,
    expert_bytes: float,
) -> dict:
    """One MoE layer (layer 0's experts) at the decode batch sizes: torch path vs fused Triton."""
    cfg = model.config
    ffn = model.layers[0].ffn
    weights = ffn.expert_weights()
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size * expert_bytes
    out = {}
    print("  MoE layer alone:")
    print(
        "  | tokens | torch ms | triton ms | triton / torch | experts routed | triton of bandwidth ceiling |"
    )
    for tokens in plan.decode_batches:
        x = torch.randn(tokens, cfg.hidden_size, device=ffn.w2.device, dtype=torch.bfloat16)
        routing = route(ffn.gate(x), cfg.moe.top_k)
        nbytes = routing.topk_ids.unique().numel() * per_expert
        t_torch = timer(lambda x=x, r=routing: TORCH_KERNELS.moe(x, r, weights), plan.repeats)
        t_triton = timer(lambda x=x, r=routing: triton_kernels.moe(x, r, weights), plan.repeats)
        frac = nbytes / bandwidth / t_triton
        out[tokens] = {"torch_ms": t_torch * 1e3, "triton_ms": t_triton * 1e3, "speedup": t_torch / t_triton}
        cells = (str(tokens), f"{t_torch * 1e3:.3f}", f"{t_triton * 1e3:.3f}", f"{t_torch / t_triton:.2f}x")
        print("  | " + " | ".join(cells) + f" | {nbytes / per_expert:.0f} | {frac:.0%} |", flush=True)
    return out


def measure(
    model: MixtralModel,
    kv: torch.Tensor,
    builder: BatchBuilder,
    plan: Plan,
    triton_kernels: TritonKernels,
    timer: Timer,
    ceiling: tuple[float, float],  # copy bandwidth (bytes/s), GEMM rate (FLOP/s)
    expert_bytes: float,  # bytes per expert weight
    prefill: bool = True,
) -> dict:
    bandwidth, flop_rate = ceiling
    out: dict[str, object] = {}
    graphs = None
    if plan.graphs:
        model.use_kernels(triton_kernels)
        graphs = DecodeGraphs(model, kv, builder.max_blocks_per_seq, list(plan.decode_batches))
        graphs.capture()
    out["moe"] = moe_speed(model, plan, triton_kernels, timer, bandwidth, expert_bytes)
    print("  decode steps (whole model, logits included):")
    print("  | batch | path | step ms | tokens/s | bytes to read | of bandwidth ceiling |")
    for batch in plan.decode_batches:
        ids, meta = build(builder, decode_chunks(plan, batch))
        nbytes = step_bytes(model, ids, kv, meta, batch * (plan.context + 1), expert_bytes)
        paths = {"torch": TORCH_KERNELS, "triton": triton_kernels}
        if graphs is not None:
            paths["triton+graphs"] = triton_kernels
        row: dict[str, object] = {}
        for label, kernels in paths.items():
            model.use_kernels(kernels)
            if label == "triton+graphs":
                t = timer(lambda g=graphs, i=ids, m=meta: model.compute_logits(g.run(i, m)), plan.repeats)
            else:
                t = timer(lambda i=ids, m=meta: model.compute_logits(model(i, kv, m)), plan.repeats)
            row[label] = {"ms": t * 1e3, "tokens_per_s": batch / t, "fraction": nbytes / bandwidth / t}
            cells = (batch, label, f"{t * 1e3:.2f}", f"{batch / t:.0f}", f"{nbytes / GB:.2f} GB")
            print("  | " + " | ".join(map(str, cells)) + f" | {nbytes / bandwidth / t:.0%} |", flush=True)
        out[f"decode_{batch}"] = row
    del graphs
    if prefill:
        ids, meta = build(builder, [chunk_after_decodes(plan, 0, plan.prefill_tokens)])
        flops = step_flops(model.config, plan.prefill_tokens)
        row = {}
        print(f"  prefill of {plan.prefill_tokens} tokens ({flops / 1e12:.1f} TFLOP):")
        for label, kernels in (("torch", TORCH_KERNELS), ("triton", triton_kernels)):
            model.use_kernels(kernels)
            t = timer(
                lambda i=ids, m=meta: model.compute_logits(model(i, kv, m)[-1:]), max(1, plan.repeats // 2)
            )
            row[label] = {
                "ms": t * 1e3,
                "tokens_per_s": plan.prefill_tokens / t,
                "fraction": flops / t / flop_rate,
            }
            rate, frac = plan.prefill_tokens / t, flops / t / flop_rate
            print(f"  | {label} | {t * 1e3:.1f} ms | {rate:.0f} tokens/s | {frac:.0%} of GEMM rate |")
        out["prefill"] = row
    return out


if __name__ == "__main__":
    raise SystemExit(main())
