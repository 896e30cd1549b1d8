"""Building a ready engine from its settings: check it fits, load, size the KV pool, warm up.

The KV pool is `kv_cache_memory_gb` when that is set. Otherwise, on a GPU, it is what
`gpu_memory_utilization` of the device's total memory leaves once the weights are loaded and a
forward of the largest step the scheduler may build has run (vLLM's rule), read from a
`MemoryProbe` of that device; on a CPU it is `CPU_KV_CACHE_GB`.

Under tensor or expert parallelism every rank runs `load_share` in step: each loads its share of
the weights and sizes its own pool (the sizes above are per rank), and the ranks agree on the
fewest blocks any of them holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import CPU_KV_CACHE_GB, EngineArgs, EngineConfig, context_length
from engine.llm_engine import Engine
from engine.memory import CudaMemory, MemoryProbe, check_fits, device_memory_bytes, kv_pool_bytes, plan_memory
from engine.sampling_params import SamplingParams
from engine.step_channel import capacity_words
from engine.structured import GrammarCompiler
from engine.structured.llguidance_backend import LLGuidanceBackend
from engine.workers import RankMemory, WorkerGroup, rank_device, start_workers, threads_per_rank
from model.batch import BatchBuilder, SequenceChunk
from model.config import load_config, normalize_dtype_name
from model.loader import ProgressFn, load_model
from model.mixtral import MixtralModel, allocate_kv_cache, kv_cache_bytes_per_token
from model.ops import select_kernels
from model.parallel import SINGLE, Parallel
from model.quant import resolve_quant
from tokenization.prompt_encoder import PromptEncoder
from tokenization.vocabulary import build_vocabulary

logger = logging.getLogger(__name__)
_GIB = 1024**3


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the startup line reports."""

    weights_bytes: int
    kv_cache_bytes: int
    kv_tokens: int
    max_model_len: int
    load_seconds: float


@dataclass(frozen=True, slots=True)
class RankShare:
    """One rank's part of an engine: its share of the model and the config every rank runs with."""

    model: MixtralModel
    config: EngineConfig
    memory: RankMemory  # this rank's parameters, and what loading them cost its process
    kv_cache_bytes: int  # this rank's KV pool


def build_engine(
    model_dir: Path,
    args: EngineArgs,
    encoder: PromptEncoder,
    progress: ProgressFn | None = None,
    probe: MemoryProbe | None = None,
) -> tuple[Engine, EngineInfo]:
    """Load the checkpoint, size the KV pool, and run a warm-up request.

    With `tensor_parallel_size` N > 1 this is rank 0: it starts N-1 worker ranks first
    (`engine.workers`), each of which loads and sizes its own share in step with this one.
    `probe`: the memory of the device the pool is sized from (default: the CUDA device's, on a
    GPU; none on a CPU). Tests inject one to size a pool on a CPU.
    """
    start = time.monotonic()
    check_memory(model_dir, args)
    workers: WorkerGroup | None = None
    parallel = SINGLE
    if args.tensor_parallel_size > 1:
        if probe is not None:  # it would size rank 0's pool alone, and its forward be rank 0's alone
            raise ValueError("a memory probe sizes one rank's pool: not with tensor_parallel_size > 1")
        if not args.device.startswith("cuda"):
            torch.set_num_threads(threads_per_rank(args.tensor_parallel_size))
        workers, parallel = start_workers(model_dir, args, step_words(model_dir, args))
    try:
        share = load_share(
            model_dir, args, parallel, progress, probe, workers.wait_loaded if workers else None
        )
        engine = Engine(
            share.model,
            share.config,
            encoder,
            encoder.eos_id,
            seed=args.seed,
            grammars=grammar_compiler(encoder, share.model),
            workers=workers,
        )
        warm_up(engine, encoder)
    except BaseException:
        if workers is not None:
            workers.close(failed=True)
        raise
    config = share.config
    info = EngineInfo(
        share.memory.weights_bytes * parallel.size,
        share.kv_cache_bytes * parallel.size,
        config.kv_capacity_tokens,
        config.max_model_len,
        time.monotonic() - start,
    )
    return engine, info


def load_share(
    model_dir: Path,
    args: EngineArgs,
    parallel: Parallel,
    progress: ProgressFn | None = None,
    probe: MemoryProbe | None = None,
    loaded: Callable[[RankMemory], None] | None = None,
) -> RankShare:
    """Load this rank's share of the model and size its KV pool; every rank calls it in step.

    `loaded(memory)` runs once the weights are in: rank 0 waits there
    for the workers' loads, and a worker says it is done and what it holds. The collectives that
    size the pool come after it: all ranks take the fewest blocks any of them has room for, so
    the block tables are the same everywhere.
    """
    device = rank_device(args.device, parallel.rank)
    if probe is None and device.startswith("cuda") and args.kv_cache_memory_gb is None:
        probe = CudaMemory(torch.device(device))  # before the weights: what is ours is what grows
    rss_before = resident_bytes()
    model = load_model(
        model_dir, args.dtype, device, args.max_model_len, progress, args.quantization, parallel
    )
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # before CPU packing
    memory = RankMemory(weights, resident_bytes() - rss_before)
    if loaded is not None:
        loaded(memory)
    kv_bytes = kv_cache_budget(model, args, probe)
    dtype = model.embed_tokens.weight.dtype
    per_block = kv_cache_bytes_per_token(model.config, dtype, parallel) * args.block_size
    num_blocks = _fewest_blocks(max(1, kv_bytes // per_block), parallel, device)
    max_len = context_length(
        args.max_model_len, model.config.max_position_embeddings, num_blocks * args.block_size
    )
    config = EngineConfig(
        max_model_len=max_len,
        num_kv_blocks=num_blocks,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_num_seqs),
        enable_prefix_caching=args.enable_prefix_caching,
        kernels=args.kernels,
        cuda_graph_max_batch=args.cuda_graph_max_batch,
        max_queue_time_s=args.max_queue_time_s,
    )
    return RankShare(model, config, memory, num_blocks * per_block)


def resident_bytes() -> int:
    """This process's own resident memory: RSS less its file-backed pages (RssAnon), so that
    library code first touched while loading, and the checkpoint's mapped pages, do not count."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _fewest_blocks(num_blocks: int, parallel: Parallel, device: str) -> int:
    if parallel.size == 1:
        return num_blocks
    count = torch.tensor([num_blocks], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN, group=parallel.group)
    return int(count.item())


def step_words(model_dir: Path, args: EngineArgs) -> int:
    """The step buffer the workers read (`engine.step_channel`), sized for the largest step."""
    config = load_config(model_dir, args.max_model_len)
    longest = context_length(args.max_model_len, config.max_position_embeddings)
    tokens = max(args.max_num_batched_tokens, args.max_num_seqs)
    return capacity_words(args.max_num_seqs, tokens, -(-longest // args.block_size))


def grammar_compiler(encoder: PromptEncoder, model: MixtralModel) -> GrammarCompiler:
    """Structured output for this tokenizer, over the model's logits (llguidance)."""
    return GrammarCompiler(LLGuidanceBackend(build_vocabulary(encoder), model.config.vocab_size))


def kv_cache_budget(model: MixtralModel, args: EngineArgs, probe: MemoryProbe | None) -> int:
    """Bytes for this rank's KV pool: `kv_cache_memory_gb` if set (per rank, as vLLM's is per
    GPU), else what the device leaves (probed), else (a CPU) its share of CPU_KV_CACHE_GB."""
    if args.kv_cache_memory_gb is not None:
        return int(args.kv_cache_memory_gb * _GIB)
    if probe is None:  # a CPU: the ranks share the host's memory, and so CPU_KV_CACHE_GB
        return int(CPU_KV_CACHE_GB * _GIB) // model.parallel.size
    peak = largest_step_peak_bytes(model, args, probe)
    budget = kv_pool_bytes(probe.total_bytes(), args.gpu_memory_utilization, peak)
    logger.info(
        "KV pool: %.2f GiB (%.0f%% of %.1f GiB, less %.2f GiB of weights and activations)",
        budget / _GIB, 100 * args.gpu_memory_utilization, probe.total_bytes() / _GIB, peak / _GIB,
    )  # fmt: skip
    return budget


def largest_step_peak_bytes(model: MixtralModel, args: EngineArgs, probe: MemoryProbe) -> int:
    """Memory in use at the peak of a forward of the largest step the scheduler may build
    (`max_num_batched_tokens` prompt tokens over `max_num_seqs` sequences, none longer than the
    context), on the kernels the engine will use, then the logits of every token with their
    log-softmax (what a request for prompt logprobs costs), less the small KV pool that forward
    needed. Not counted: the memory of the CUDA graphs captured later (decode shapes, small
    next to the prefill's), which the share left out of `gpu_memory_utilization` covers."""
    device = model.embed_tokens.weight.device
    model.use_kernels(select_kernels(args.kernels, device))
    longest = context_length(args.max_model_len, model.config.max_position_embeddings)
    seqs = min(args.max_num_seqs, max(args.max_num_batched_tokens, args.max_num_seqs))
    tokens = min(max(args.max_num_batched_tokens, args.max_num_seqs), seqs * longest)
    lengths = [tokens // seqs + (i < tokens % seqs) for i in range(seqs)]
    blocks_per_seq = -(-max(lengths) // args.block_size)
    builder = BatchBuilder(tokens, seqs, blocks_per_seq, args.block_size, device)
    probe.reset_peak()
    kv_cache = allocate_kv_cache(
        model.config, seqs * blocks_per_seq, args.block_size, model.embed_tokens.weight.dtype, device,
        model.parallel,
    )  # fmt: skip
    chunks = [
        SequenceChunk([1] * n, 0, range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        for i, n in enumerate(lengths)
    ]
    batch = builder.build(chunks)
    hidden = model(batch.input_ids, kv_cache, batch.attn)  # [T, D]
    torch.log_softmax(model.compute_logits(hidden), dim=-1)  # [T, V] fp32, as prompt logprobs do
    peak = probe.peak_bytes() - kv_cache.numel() * kv_cache.element_size()
    del kv_cache, hidden, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return peak


def check_memory(model_dir: Path, args: EngineArgs) -> None:
    """Refuse before loading when weights + the KV pool cannot fit the device."""
    config = load_config(model_dir, args.max_model_len)
    max_len = context_length(args.max_model_len, config.max_position_embeddings)
    dtype = getattr(torch, normalize_dtype_name(args.dtype or config.checkpoint_dtype))
    quant = resolve_quant(args.quantization, args.device)
    on_cpu = not args.device.startswith("cuda")
    kv_gb = args.kv_cache_memory_gb or (CPU_KV_CACHE_GB if on_cpu else 0.0)  # 0: sized later
    ranks = args.tensor_parallel_size
    share = Parallel(0, ranks, args.expert_parallel)  # every rank's share is the same size
    share.check(config)
    device_bytes = device_memory_bytes(args.device)
    if on_cpu:  # the ranks share the host's memory
        device_bytes //= ranks
    plan = plan_memory(config, dtype, max_len, int(kv_gb * _GIB), device_bytes, quant, share)
    check_fits(plan, args.device if ranks == 1 else f"{args.device} (per rank of {ranks})", dtype)


def warm_up(engine: Engine, encoder: PromptEncoder) -> None:
    """One short greedy request through every stage (prefill, decode, sampling, detokenizing)."""
    prompt = encoder.encode_text("Hello", bos=True)[: engine.config.max_model_len - 2]
    engine.add_request("warm-up", prompt, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    while engine.has_work:
        engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
