"""Checkpoint loading: tensor by tensor from memory-mapped files into a model built on the meta device.

The model is constructed without storage, given storage once on the target device and dtype, and
filled one tensor at a time straight from the memory-mapped checkpoint, so peak host memory stays
near one copy of the weights (plus the tensor in flight).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from model.checkpoint_layouts import (
    IGNORED_TENSORS,
    Layout,
    Placement,
    Placements,
    layout_names,
    optional_names,
)
from model.config import ModelConfig, load_config, normalize_dtype_name
from model.mixtral import MixtralModel
from model.parallel import SINGLE, Parallel
from model.quant import QuantLinear, WeightQuant, quantize_rows, resolve_quant

logger = logging.getLogger(__name__)

# Called with (bytes loaded so far, total bytes) after each tensor.
ProgressFn = Callable[[int, int], None]

_MAX_NAMES_IN_ERROR = 12


class CheckpointError(ValueError):
    """The checkpoint's files or tensors do not match what its configuration describes."""


@dataclass(frozen=True, slots=True)
class CheckpointFiles:
    layout_family: str  # "hf" or "consolidated"
    files: tuple[Path, ...]


def find_checkpoint_files(model_dir: Path) -> CheckpointFiles:
    """The weight files of a checkpoint directory, in the order they should be read."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: shards named in the index are missing: {', '.join(missing)}")
        return CheckpointFiles("hf", tuple(files))
    for family, pattern in (
        ("hf", "model*.safetensors"),
        ("consolidated", "consolidated*.safetensors"),
        ("consolidated", "consolidated*.pth"),
    ):
        found = sorted(model_dir.glob(pattern))
        if found:
            return CheckpointFiles(family, tuple(found))
    raise CheckpointError(
        f"{model_dir}: no weights found (model*.safetensors, consolidated*.safetensors or consolidated*.pth)"
    )


class TensorReader:
    """Lazy, memory-mapped access to the tensors of a checkpoint's files."""

    def __init__(self, files: tuple[Path, ...], stack: ExitStack) -> None:
        self._where: dict[str, object] = {}
        for path in files:
            if path.suffix == ".safetensors":
                handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                names = handle.keys()
            else:
                handle = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                names = handle.keys()
            for name in names:
                if name in self._where:
                    raise CheckpointError(f"tensor {name!r} appears in more than one file")
                self._where[name] = handle

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str, part: tuple[slice, ...] = ()) -> torch.Tensor:
        """Tensor `name`, or only `part` of it: a safetensors slice reads just those bytes, and a
        memory-mapped .pth tensor's view touches only those pages when copied."""
        handle = self._where[name]
        if isinstance(handle, dict):
            return handle[name][part] if part else handle[name]
        if part:
            return handle.get_slice(name)[part]  # type: ignore[attr-defined]
        return handle.get_tensor(name)  # type: ignore[attr-defined]


def detect_layout(family: str, names: set[str], config: ModelConfig) -> Layout:
    if family == "hf":
        return Layout.HF_FUSED if any(n.endswith("mlp.experts.gate_up_proj") for n in names) else Layout.HF
    if any(".block_sparse_moe.w1" in n for n in names):
        return Layout.CONSOLIDATED_STACKED
    return Layout.CONSOLIDATED


def check_names(expected: Placements, present: set[str], optional: set[str]) -> None:
    """Raise a `CheckpointError` listing missing and unexpected tensors, if any."""
    missing = sorted(set(expected) - present)
    unexpected = sorted(n for n in present - set(expected) - optional if not IGNORED_TENSORS.match(n))
    if not missing and not unexpected:
        return
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            shown = ", ".join(names[:_MAX_NAMES_IN_ERROR])
            more = (
                f" (and {len(names) - _MAX_NAMES_IN_ERROR} more)" if len(names) > _MAX_NAMES_IN_ERROR else ""
            )
            parts.append(f"{len(names)} {label} tensor(s): {shown}{more}")
    raise CheckpointError("checkpoint does not match its config: " + "; ".join(parts))


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    max_model_len: int | None = None,
    progress: ProgressFn | None = None,
    quantization: str | None = None,
    parallel: Parallel = SINGLE,
) -> MixtralModel:
    """Load a checkpoint (any supported layout) onto `device` in `dtype` (default: the checkpoint's).

    With `quantization` ('int8', 'fp8' or '8bit', see `model.quant`) the experts are quantized
    tensor by tensor as they stream from the file: only their 8-bit form is ever allocated. int8
    on a CPU quantizes attention's projections and the LM head too, once loaded.
    With a `Parallel` of several ranks, this rank's share (`model.parallel`): only its slices
    are read and allocated.
    """
    path = Path(model_dir)
    config = load_config(path, max_model_len)
    torch_dtype = _resolve_dtype(dtype, config)
    scheme = resolve_quant(quantization, device)
    ckpt = find_checkpoint_files(path)
    with torch.device("meta"):
        model = MixtralModel(config, parallel).to(torch_dtype)
        model.quantize_experts_(scheme)  # after .to(): fp8 storage must not be cast to 16 bits
    model.to_empty(device=torch.device(device))  # the only allocation: one copy, in the final dtype
    model.rotary.reset_cache()
    model.tie_weights()
    with ExitStack() as stack:
        reader = TensorReader(ckpt.files, stack)
        present = reader.names()
        layout = detect_layout(ckpt.layout_family, present, config)
        check_names(layout_names(config, layout), present, optional_names(config, layout))
        _fill(model, reader, layout_names(config, layout, parallel), progress, scheme)
    if scheme is WeightQuant.INT8 and torch.device(device).type == "cpu":
        model.quantize_linears_(scheme)  # the CPU's int8 kernel serves every linear layer
    quantized = "linear layers" if isinstance(model.lm_head, QuantLinear) else "experts"
    quant = "" if scheme is WeightQuant.NONE else f" with {scheme.value} {quantized}"
    share = f" (rank {parallel.rank} of {parallel.size})" if parallel.size > 1 else ""
    logger.info(
        "loaded %s (%s layout) as %s%s on %s%s", path, layout.value, torch_dtype, quant, device, share
    )
    return model.eval()


def _resolve_dtype(dtype: str | torch.dtype | None, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, normalize_dtype_name(dtype or config.checkpoint_dtype))


def _fill(
    model: MixtralModel,
    reader: TensorReader,
    expected: Placements,
    progress: ProgressFn | None,
    scheme: WeightQuant = WeightQuant.NONE,
) -> None:
    params = dict(model.named_parameters())
    filled = dict.fromkeys(params, 0)
    total = sum(p.numel() * p.element_size() for p in params.values())
    done = 0
    for name, place in _ordered(expected):
        dest = params[place.param][place.region] if place.region else params[place.param]
        src = reader.get(name, place.source)
        if place.transform is not None:
            src = place.transform(src)
        if src.shape != dest.shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(src.shape)}, "
                f"expected {tuple(dest.shape)} for {place.param}"
            )
        with torch.no_grad():
            if dest.dtype == scheme.dtype:  # an 8-bit expert weight: quantize rows, fill q and scales
                q, scale = quantize_rows(src.to(dest.device), scheme)
                dest.copy_(q)
                scales = params[f"{place.param}_scale"]
                (scales[place.region] if place.region else scales).copy_(scale)
                filled[f"{place.param}_scale"] += scale.numel()
                done += scale.numel() * scale.element_size()
            else:
                dest.copy_(src)
        filled[place.param] += dest.numel()
        done += dest.numel() * dest.element_size()
        if progress is not None:
            progress(done, total)
    unfilled = [n for n, p in params.items() if filled[n] != p.numel()]
    assert not unfilled, f"layout map does not cover every parameter exactly once: {unfilled}"


def _ordered(expected: Placements) -> Iterator[tuple[str, Placement]]:
    """Read tensors in name order: files are written that way, so reads stay mostly sequential."""
    for name, placements in sorted(expected.items()):
        for place in placements:
            yield name, place
