"""Building a ready engine from serving settings: load, size the KV pool, warm up."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.llm_engine import Engine
from engine.memory import check_fits, device_memory_bytes, plan_memory
from engine.sampling_params import SamplingParams
from model.config import load_config, normalize_dtype_name
from model.loader import ProgressFn, load_model
from model.mixtral import kv_cache_bytes_per_token
from model.quant import resolve_quant
from tokenization.prompt_encoder import PromptEncoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineSpec:
    model_dir: Path
    dtype: str | None
    device: str
    max_model_len: int | None
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    kv_cache_bytes: int
    enable_prefix_caching: bool
    seed: int = 0
    quantization: str = "none"  # "none", "8bit", "int8", "fp8": the experts' storage
    kernels: str = "auto"
    cuda_graph_max_batch: int = 128
    max_queue_time_s: float | None = None


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the startup line reports."""

    weights_bytes: int
    kv_cache_bytes: int
    kv_tokens: int
    max_model_len: int
    load_seconds: float


def build_engine(
    spec: EngineSpec, encoder: PromptEncoder, progress: ProgressFn | None = None
) -> tuple[Engine, EngineInfo]:
    """Load the checkpoint, size the KV pool from `kv_cache_bytes`, and run a warm-up request."""
    start = time.monotonic()
    check_memory(spec)
    model = load_model(
        spec.model_dir, spec.dtype, spec.device, spec.max_model_len, progress, spec.quantization
    )
    dtype = model.embed_tokens.weight.dtype
    per_block = kv_cache_bytes_per_token(model.config, dtype) * spec.block_size
    num_blocks = max(1, spec.kv_cache_bytes // per_block)
    max_len = min(spec.max_model_len or model.config.max_position_embeddings, num_blocks * spec.block_size)
    config = EngineConfig(
        max_model_len=max_len,
        num_kv_blocks=num_blocks,
        block_size=spec.block_size,
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=max(spec.max_num_batched_tokens, spec.max_num_seqs),
        enable_prefix_caching=spec.enable_prefix_caching,
        kernels=spec.kernels,
        cuda_graph_max_batch=spec.cuda_graph_max_batch,
        max_queue_time_s=spec.max_queue_time_s,
    )
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # before CPU packing
    engine = Engine(model, config, encoder, encoder.eos_id, seed=spec.seed)
    warm_up(engine, encoder)
    info = EngineInfo(
        weights, num_blocks * per_block, num_blocks * spec.block_size, max_len, time.monotonic() - start
    )
    return engine, info


def check_memory(spec: EngineSpec) -> None:
    """Refuse before loading when weights + the KV pool cannot fit the device."""
    config = load_config(spec.model_dir, spec.max_model_len)
    if spec.max_model_len and spec.max_model_len > config.max_position_embeddings:
        raise ValueError(
            f"max_model_len {spec.max_model_len} is longer than the checkpoint's context "
            f"({config.max_position_embeddings} positions); rope scaling is not implemented"
        )
    dtype = getattr(torch, normalize_dtype_name(spec.dtype or config.checkpoint_dtype))
    max_len = spec.max_model_len or config.max_position_embeddings
    quant = resolve_quant(spec.quantization, spec.device)
    plan = plan_memory(config, dtype, max_len, spec.kv_cache_bytes, device_memory_bytes(spec.device), quant)
    check_fits(plan, spec.device, dtype)


def warm_up(engine: Engine, encoder: PromptEncoder) -> None:
    """One short greedy request through every stage (prefill, decode, sampling, detokenizing)."""
    prompt = encoder.encode_text("Hello", bos=True)[: engine.config.max_model_len - 2]
    engine.add_request("warm-up", prompt, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    while engine.has_work:
        engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
