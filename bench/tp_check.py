"""GPU check, tensor-parallel section: Mixtral's layer shapes split over two ranks against one rank.

    python3 bench/tp_check.py                    # on a CUDA machine (gpu_check.py runs it last)
    python3 bench/tp_check.py --json out.json
    TRITON_INTERPRET=1 python3 bench/tp_check.py --smoke   # tiny shapes on CPU, gloo (what CI runs)

With two or more GPUs the ranks use NCCL, rank r on cuda:r, and each also replays its decode
step from a CUDA graph (the all-reduces captured). With one GPU both ranks share it over gloo:
that checks the per-rank Triton shapes (a slice of every expert, N = 7168 at Mixtral's sizes,
and its tile table) but not NCCL, and its timings say nothing about interconnects.

A random checkpoint with Mixtral 8x7B's layer shapes (2 layers by default) is written in the
HF layout and loaded three times: whole, as the reference on the Triton path, then by each rank
for its share (`model.parallel`, the sharded loader). Each forward runs the same mixed step
(8 decodes and a prefill chunk); rank 0's gathered logits are compared with the reference's.
Then decode steps at batch 1 and 32 are timed on rank 0 (CUDA events, median).
Imports only torch, triton, safetensors and our model package.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from bench.gpu_check import (  # noqa: E402
    BLOCK,
    Check,
    Timer,
    chunk_after_decodes,
    decode_chunks,
    mixtral_layer_config,
    random_model,
    rel_err,
    smoke_plan,
)
from bench.gpu_check import Plan as CheckPlan  # noqa: E402
from model.batch import BatchBuilder  # noqa: E402
from model.checkpoint_layouts import Layout, layout_names  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.cuda_graphs import DecodeGraphs  # noqa: E402
from model.loader import load_model  # noqa: E402
from model.mixtral import MixtralModel, allocate_kv_cache  # noqa: E402
from model.parallel import Parallel  # noqa: E402
from model.triton_backend.kernels import TritonKernels  # noqa: E402
from model.triton_backend.moe_configs import moe_tile_config, tuned_table  # noqa: E402

RANKS = 2
TIMED_BATCHES = (1, 32)


def write_checkpoint(config: ModelConfig, out: Path) -> Path:
    """Random bf16 weights in the HF layout (model.safetensors + config.json)."""
    model = random_model(config, torch.device("cpu"), torch.bfloat16)
    params = dict(model.named_parameters())
    tensors = {}
    for name, placements in layout_names(config, Layout.HF).items():
        (place,) = placements
        tensor = params[place.param][place.region] if place.region else params[place.param]
        tensors[name] = tensor.contiguous().clone()
    save_file(tensors, str(out / "model.safetensors"))
    assert config.moe is not None
    hf_config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "num_local_experts": config.moe.num_experts,
        "num_experts_per_tok": config.moe.top_k,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(hf_config))
    return out


def plan_for(smoke: bool, layers: int) -> CheckPlan:
    if smoke:
        return smoke_plan()
    return CheckPlan(mixtral_layer_config(layers), TIMED_BATCHES, 512, 64, 10, graphs=True)


def mixed_step(plan: CheckPlan) -> list:
    """The checked step: 8 decodes, then a 40-token chunk after 20 cached tokens."""
    return [*decode_chunks(plan, 8), chunk_after_decodes(plan, 20, 40)]


def forward_logits(model: MixtralModel, plan: CheckPlan, device: torch.device) -> torch.Tensor:
    kv = allocate_kv_cache(model.config, plan.kv_blocks, BLOCK, torch.bfloat16, device, model.parallel)
    builder = BatchBuilder(4096, plan.max_seqs, plan.max_blocks_per_seq, BLOCK, device)
    batch = builder.build(mixed_step(plan))
    with torch.inference_mode():
        return model.compute_logits(model(batch.input_ids, kv, batch.attn))  # [T, V] on rank 0


def _rank(rank: int, path: str, smoke: bool, layers: int, port: int, out: str) -> None:
    cuda = not smoke
    several = cuda and torch.cuda.device_count() >= RANKS
    device = torch.device(f"cuda:{rank}" if several else ("cuda:0" if cuda else "cpu"))
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if several else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    plan = plan_for(smoke, layers)
    model = load_model(path, "bfloat16", device, parallel=Parallel(rank, RANKS))
    model.use_kernels(TritonKernels(upcast=not cuda))
    result: dict[str, object] = {"backend": backend, "device": str(device)}
    local_ffn = model.layers[0].ffn.w2.shape[-1]
    result["rank_ffn"] = local_ffn
    result["rank_weights_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    if cuda:
        name = torch.cuda.get_device_name(device)
        table = tuned_table(model.layers[0].ffn.num_experts, local_ffn, name)
        result["tile_table"] = "tuned" if table else "untuned default"
        result["tile_at_1_token"] = str(
            moe_tile_config(model.layers[0].ffn.num_experts, local_ffn, 1, device)
        )
    logits = forward_logits(model, plan, device)
    if rank == 0:
        torch.save(logits.cpu(), Path(out) / "tp_logits.pt")
    timer = Timer(device)
    kv = allocate_kv_cache(model.config, plan.kv_blocks, BLOCK, torch.bfloat16, device, model.parallel)
    builder = BatchBuilder(4096, plan.max_seqs, plan.max_blocks_per_seq, BLOCK, device)
    steps: dict[str, float] = {}
    for batch_size in plan.decode_batches:
        batch = builder.build(decode_chunks(plan, batch_size))
        ids, meta = batch.input_ids, batch.attn
        with torch.inference_mode():
            t = timer(lambda i=ids, m=meta: model.compute_logits(model(i, kv, m)), plan.repeats)
        steps[f"eager_{batch_size}"] = t * 1e3
        if backend == "nccl" and plan.graphs:
            graphs = DecodeGraphs(model, kv, builder.max_blocks_per_seq, [batch_size])
            graphs.capture()
            with torch.inference_mode():
                eager = model.compute_logits(model(ids, kv, meta))
                replayed = model.compute_logits(graphs.run(ids, meta))
                t = timer(lambda i=ids, m=meta, g=graphs: model.compute_logits(g.run(i, m)), plan.repeats)
            steps[f"graphs_{batch_size}"] = t * 1e3
            if rank == 0:
                result[f"graphs_rel_err_{batch_size}"] = rel_err(replayed, eager)
            del graphs
    result["step_ms"] = steps
    if rank == 0:
        (Path(out) / "tp_rank0.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run(smoke: bool, layers: int, check: Check) -> dict[str, object]:
    """The section: returns its figures; failed checks go to `check`."""
    plan = plan_for(smoke, layers)
    device = torch.device("cpu" if smoke else "cuda:0")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(plan.config, Path(tmp))
        started = time.monotonic()
        reference = load_model(path, "bfloat16", device)
        reference.use_kernels(TritonKernels(upcast=smoke))
        want = forward_logits(reference, plan, device).float().cpu()
        one_rank_ms: dict[str, float] = {}
        timer = Timer(device)
        kv = allocate_kv_cache(plan.config, plan.kv_blocks, BLOCK, torch.bfloat16, device)
        builder = BatchBuilder(4096, plan.max_seqs, plan.max_blocks_per_seq, BLOCK, device)
        for batch_size in plan.decode_batches:
            batch = builder.build(decode_chunks(plan, batch_size))
            ids, meta = batch.input_ids, batch.attn
            with torch.inference_mode():
                step = lambda i=ids, m=meta, r=reference, c=kv: r.compute_logits(r(i, c, m))  # noqa: E731
                t = timer(step, plan.repeats)
            one_rank_ms[f"eager_{batch_size}"] = t * 1e3
        del reference, kv
        if device.type == "cuda":
            torch.cuda.empty_cache()
        mp.spawn(_rank, args=(str(path), smoke, layers, _free_port(), tmp), nprocs=RANKS, join=True)
        got = torch.load(Path(tmp) / "tp_logits.pt").float()
        ranks = json.loads((Path(tmp) / "tp_rank0.json").read_text())
    print(
        f"tensor parallel: {RANKS} ranks over {ranks['backend']} ({ranks['device']} for rank 0)", flush=True
    )
    print(
        f"  each rank: {ranks['rank_weights_gb']:.2f} GB of weights, a {ranks['rank_ffn']}-wide slice of "
        f"every expert; fused-MoE tiles: {ranks.get('tile_table', 'interpreter default')}"
    )
    check("TP=2 logits vs one rank (bf16, Triton)", rel_err(got, want), 2e-2)
    for key, err in ranks.items():
        if key.startswith("graphs_rel_err_"):
            check(f"TP=2 CUDA-graph replay vs eager, batch {key.rsplit('_', 1)[1]}", err, 1e-2)
    print("  | batch | one rank ms | TP=2 eager ms | TP=2 graphs ms |")
    for batch_size in plan.decode_batches:
        graphs = ranks["step_ms"].get(f"graphs_{batch_size}")
        cells = (
            batch_size,
            f"{one_rank_ms[f'eager_{batch_size}']:.2f}",
            f"{ranks['step_ms'][f'eager_{batch_size}']:.2f}",
            "" if graphs is None else f"{graphs:.2f}",
        )
        print("  | " + " | ".join(map(str, cells)) + " |")
    return {
        "layers": plan.config.num_layers,
        "one_rank_ms": one_rank_ms,
        "seconds": time.monotonic() - started,
    } | ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers at Mixtral's shapes")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke under TRITON_INTERPRET=1 on CPU", file=sys.stderr)
        return 2
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    torch.manual_seed(0)
    check = Check()
    results = run(args.smoke, args.layers, check)
    results["failures"] = check.failures
    print(f"{len(check.failures)} check(s) failed {check.failures or ''}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if check.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
