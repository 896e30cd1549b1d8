"""Engine configuration: parsed once, validated here, frozen."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_model_len: int  # prompt + output tokens of one sequence
    num_kv_blocks: int  # size of the paged KV pool
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 2048  # tokens in one step (the chunked-prefill budget)
    enable_prefix_caching: bool = True
    pack_cpu_weights: bool = True  # oneDNN-prepacked GEMM weights on CPU (model.packed_linear)
    kernels: str = "auto"  # "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton" (model.ops)
    cuda_graph_max_batch: int = 128  # decode batches up to this replay CUDA graphs; 0: always eager
    max_queue_time_s: float | None = None  # a request not started within this is dropped; None: no bound

    def __post_init__(self) -> None:
        if self.kernels not in ("auto", "torch", "triton"):
            raise ValueError(f"kernels must be auto, torch or triton, got {self.kernels!r}")
        if self.max_queue_time_s is not None and self.max_queue_time_s <= 0:
            raise ValueError(f"max_queue_time_s must be positive or None, got {self.max_queue_time_s}")
        if self.cuda_graph_max_batch < 0:
            raise ValueError(f"cuda_graph_max_batch must be >= 0, got {self.cuda_graph_max_batch}")
        for name in (
            "max_model_len",
            "num_kv_blocks",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size
