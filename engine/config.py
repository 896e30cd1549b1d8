"""Engine configuration: what a deployment chooses (`EngineArgs`, the one source of those
settings' types and defaults) and what the engine runs with once the model and the KV pool are
known (`EngineConfig`). Parsed once, validated here, frozen. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.options import DType, KernelChoice, Quantization, choices

# The KV pool on a CPU, where there is no device memory to size it from.
CPU_KV_CACHE_GB = 1.0
# Below this, one output with its alternatives (a few KiB) could already overflow a stream's bound.
MIN_STREAM_BUFFER_BYTES = 64 * 1024
PARALLEL_SIZES = (1, 2, 4, 8)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _check_runtime(cuda_graph_max_batch: int, max_queue_time_s: float) -> None:
    if cuda_graph_max_batch < 0:
        raise ValueError(f"cuda_graph_max_batch must be >= 0, got {cuda_graph_max_batch}")
    if max_queue_time_s < 0:
        raise ValueError(f"max_queue_time_s must be >= 0 (0: no bound), got {max_queue_time_s}")


def _check_positive(config: object, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")


@dataclass(frozen=True, slots=True)
class EngineArgs:
    """Every engine setting a deployment picks. The server's settings, and so its YAML keys,
    `MIXTRAL_*` variables and flags, take their names, types and defaults from here."""

    dtype: DType | None = None  # None: the checkpoint's
    device: str = "cpu"  # cpu, cuda or cuda:N
    quantization: Quantization = "none"  # of the experts' weights
    kernels: KernelChoice = "auto"
    cuda_graph_max_batch: int = 128  # decode batches up to this replay CUDA graphs; 0: none
    max_model_len: int | None = None  # None: the checkpoint's context, capped by the KV pool
    max_num_seqs: int = 32  # sequences in one step
    max_num_batched_tokens: int = 2048  # tokens in one step (the chunked-prefill budget)
    block_size: int = 16  # tokens per KV block
    # The KV pool in GiB. None: on a GPU, what `gpu_memory_utilization` leaves after the weights
    # and a forward of the largest step; on a CPU, CPU_KV_CACHE_GB.
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9  # of the device's total memory, as vLLM's
    enable_prefix_caching: bool = True
    max_queue_time_s: float = 120.0  # a request not started within this is dropped; 0: no bound
    # A request's output left unread beyond this (a stream whose client stopped reading) aborts it.
    stream_buffer_bytes: int = 4 * 1024 * 1024
    seed: int = 0  # of the sampler, for requests without a seed of their own
    # Ranks the model is split over (engine.workers): 1, 2, 4 or 8 GPUs, or CPU processes (gloo).
    tensor_parallel_size: int = 1
    # Whole experts per rank instead of a slice of every expert (needs tensor_parallel_size <= experts).
    expert_parallel: bool = False
    # A rank that does not answer a collective within this is a fault (the engine stops).
    collective_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.dtype is not None:
            _check_choice("dtype", self.dtype, choices(DType))
        _check_choice("quantization", self.quantization, choices(Quantization))
        _check_choice("kernels", self.kernels, choices(KernelChoice))
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        _check_runtime(self.cuda_graph_max_batch, self.max_queue_time_s)
        _check_positive(self, ("max_num_seqs", "max_num_batched_tokens", "block_size"))
        if self.tensor_parallel_size not in PARALLEL_SIZES:
            raise ValueError(
                f"tensor_parallel_size must be one of {', '.join(map(str, PARALLEL_SIZES))}, "
                f"got {self.tensor_parallel_size}"
            )
        if self.expert_parallel and self.tensor_parallel_size == 1:
            raise ValueError("expert_parallel needs tensor_parallel_size > 1 (the ranks the experts go to)")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s must be positive, got {self.collective_timeout_s}")
        if self.stream_buffer_bytes < MIN_STREAM_BUFFER_BYTES:
            raise ValueError(
                f"stream_buffer_bytes must be >= {MIN_STREAM_BUFFER_BYTES}, got {self.stream_buffer_bytes}"
            )


ENGINE_DEFAULTS = EngineArgs()


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What the engine runs with: the settings of `EngineArgs` it needs at run time (same
    defaults), and the context length and KV pool the factory resolved."""

    max_model_len: int  # prompt + output tokens of one sequence
    num_kv_blocks: int  # size of the paged KV pool
    block_size: int = ENGINE_DEFAULTS.block_size
    max_num_seqs: int = ENGINE_DEFAULTS.max_num_seqs
    max_num_batched_tokens: int = ENGINE_DEFAULTS.max_num_batched_tokens
    enable_prefix_caching: bool = ENGINE_DEFAULTS.enable_prefix_caching
    pack_cpu_weights: bool = True  # oneDNN-prepacked GEMM weights on CPU (model.torch_backend.packed)
    kernels: KernelChoice = ENGINE_DEFAULTS.kernels
    cuda_graph_max_batch: int = ENGINE_DEFAULTS.cuda_graph_max_batch
    max_queue_time_s: float = ENGINE_DEFAULTS.max_queue_time_s  # 0: no bound

    def __post_init__(self) -> None:
        _check_choice("kernels", self.kernels, choices(KernelChoice))
        _check_runtime(self.cuda_graph_max_batch, self.max_queue_time_s)
        _check_positive(
            self, ("max_model_len", "num_kv_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens")
        )

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size


def context_length(requested: int | None, checkpoint_positions: int, kv_tokens: int | None = None) -> int:
    """Tokens per sequence: `requested`, or else the checkpoint's context, and never more than
    the KV pool holds (`kv_tokens`, once it is sized). Asking for more than the checkpoint's
    context is an error: rope scaling is not implemented."""
    if requested is not None and requested > checkpoint_positions:
        raise ValueError(
            f"max_model_len {requested} is longer than the checkpoint's context "
            f"({checkpoint_positions} positions); rope scaling is not implemented"
        )
    length = requested or checkpoint_positions
    return length if kv_tokens is None else min(length, kv_tokens)
