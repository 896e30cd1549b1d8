"""Device memory: will it fit (weights plus a minimum KV cache, checked before loading), and how
large the KV pool is (sized once the weights are in and a forward of the largest step has run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from model.config import ModelConfig
from model.mixtral import kv_cache_bytes_per_token
from model.parallel import SINGLE, Parallel
from model.quant import WeightQuant

_GB = 1e9
_GIB = 1024**3
# Room kept for activations, MoE intermediates, logits and (on GPU) the CUDA context.
_OVERHEAD_FRACTION = 0.08


class InsufficientMemoryError(RuntimeError):
    """The configuration cannot fit the device; the message says what would."""


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    weights_bytes: int
    min_kv_bytes: int  # one full-length sequence
    kv_bytes: int  # the configured pool
    device_bytes: int
    quant: WeightQuant = WeightQuant.NONE

    @property
    def needed_bytes(self) -> int:
        return int((self.weights_bytes + max(self.min_kv_bytes, self.kv_bytes)) * (1 + _OVERHEAD_FRACTION))


def device_memory_bytes(device: str) -> int:
    """Total memory of a CUDA device, or the memory available to this process on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[1]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read available memory")


def plan_memory(
    config: ModelConfig,
    dtype: torch.dtype,
    max_model_len: int,
    kv_bytes: int,
    device_bytes: int,
    quant: WeightQuant = WeightQuant.NONE,
    parallel: Parallel = SINGLE,
) -> MemoryPlan:
    """What one rank needs: its 1/N of the weights (the router and norms, whole on every rank,
    are noise next to that) and its kv heads' share of the cache."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = kv_cache_bytes_per_token(config, dtype, parallel)
    weights = config.num_parameters() * itemsize
    if quant is not WeightQuant.NONE:  # experts at 1 byte per weight plus an fp32 scale per row
        experts = config.num_expert_parameters()
        weights += experts * (1 - itemsize) + config.num_expert_rows() * 4
    return MemoryPlan(weights // parallel.size, max_model_len * per_token, kv_bytes, device_bytes, quant)


def check_fits(plan: MemoryPlan, device: str, dtype: torch.dtype) -> None:
    """Raise `InsufficientMemoryError` when weights + KV cache (+ margin) exceed the device."""
    if plan.needed_bytes <= plan.device_bytes:
        return
    experts = "" if plan.quant is WeightQuant.NONE else f" ({plan.quant.value} experts)"
    raise InsufficientMemoryError(
        f"does not fit {device}: {plan.weights_bytes / _GB:.1f} GB of {str(dtype).removeprefix('torch.')} "
        f"weights{experts} + {max(plan.min_kv_bytes, plan.kv_bytes) / _GB:.1f} GB of KV cache "
        f"+ {_OVERHEAD_FRACTION:.0%} margin = {plan.needed_bytes / _GB:.1f} GB, but the device has "
        f"{plan.device_bytes / _GB:.1f} GB. Use a larger device (Mixtral 8x7B in bf16 needs one "
        "141 GB H200), a shorter max_model_len / smaller kv_cache_memory_gb, 8-bit experts "
        "(quantization: 8bit; Mixtral 8x7B then takes ~48 GB), or more GPUs (tensor_parallel_size: 2 "
        "holds it in bf16 on two 80 GB GPUs)."
    )


class MemoryProbe(Protocol):
    """What the KV pool is sized from: one device's memory, as its allocator sees it."""

    def total_bytes(self) -> int:
        """The device's memory, all of it."""
        ...

    def reset_peak(self) -> None:
        """Start measuring the peak anew."""
        ...

    def peak_bytes(self) -> int:
        """The most memory in use since `reset_peak`: weights, activations and anything else resident."""
        ...


class CudaMemory:
    """`MemoryProbe` of one CUDA device, made before the weights load. What this process holds
    outside torch's allocator (libraries' workspaces) counts as in use; what was in use on the
    device before (other processes, this one's CUDA context) does not: as vLLM does, the share of
    the device is this server's own, and others on the card are theirs to size."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        free, total = torch.cuda.mem_get_info(device)
        self.used_before = total - free

    def total_bytes(self) -> int:
        """The device's memory."""
        return torch.cuda.mem_get_info(self.device)[1]

    def reset_peak(self) -> None:
        """Start measuring the peak of torch's allocations anew."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        """The peak of torch's allocations, and what grew outside them since this probe was made."""
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = (total - free - self.used_before) - torch.cuda.memory_reserved(self.device)
        return torch.cuda.max_memory_allocated(self.device) + max(outside_torch, 0)


def kv_pool_bytes(total_bytes: int, utilization: float, peak_bytes: int) -> int:
    """What `utilization` of the device leaves for the KV pool once `peak_bytes` (weights and the
    largest step's activations) are in use; `InsufficientMemoryError` when that is nothing."""
    budget = int(total_bytes * utilization)
    if budget <= peak_bytes:
        raise InsufficientMemoryError(
            f"no room for a KV cache: the weights and a forward of the largest step take "
            f"{peak_bytes / _GIB:.1f} GiB, and gpu_memory_utilization {utilization} of the device's "
            f"{total_bytes / _GIB:.1f} GiB is {budget / _GIB:.1f} GiB. Raise gpu_memory_utilization, "
            "lower max_num_batched_tokens, or use 8-bit experts (quantization: 8bit)."
        )
    return budget - peak_bytes
