"""`mixtral-server` / `python -m server`: parse settings, then serve (`server.launch`).

Arguments are parsed before torch or the web stack is imported, so `--help` and a bad flag
answer at once. Every default shown comes from `ServerSettings`, the one source of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from engine.config import CPU_KV_CACHE_GB
from server.settings import DEFAULT_MODEL, DEMO_MODELS, READY_LINE, ServerSettings, load_settings

# Defaults that are None in ServerSettings, spelled as what they mean.
_DERIVED_DEFAULTS = {
    "model": DEFAULT_MODEL,
    "served_model_name": "the checkpoint directory's name",
    "api_key": "none: the API is open, so bind to loopback",
    "dtype": "the checkpoint's",
    "max_model_len": "the checkpoint's context, capped by the KV pool",
    "kv_cache_memory_gb": f"on a GPU what --gpu-memory-utilization leaves, on a CPU {CPU_KV_CACHE_GB}",
}


def _default(name: str) -> str:
    if name in _DERIVED_DEFAULTS:
        return _DERIVED_DEFAULTS[name]
    field = ServerSettings.model_fields[name]
    return str(field.get_default(call_default_factory=True))


def _typed(name: str) -> dict[str, Any]:
    """argparse's `type` or `choices` for a setting, read off its annotation in ServerSettings."""
    annotation = ServerSettings.model_fields[name].annotation
    kinds = (
        [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) else [annotation]
    )
    kind = kinds[0] if len(kinds) == 1 else annotation
    if get_origin(kind) is Literal:
        return {"choices": get_args(kind)}
    if kind in (int, float):
        return {"type": kind, "metavar": "N"}
    return {}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mixtral-server",
        description="Serve Mixtral (or any Mistral or Llama checkpoint) behind the Mistral and OpenAI APIs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flagged: list[str] = []

    def add(flag: str, help_: str, **kwargs: Any) -> None:
        dest = flag.removeprefix("--").replace("-", "_")
        flagged.append(dest)
        p.add_argument(flag, dest=dest, help=f"{help_} (default: {_default(dest)})", **_typed(dest) | kwargs)

    demos = "; ".join(f"{name}: {description}" for name, (_, description) in DEMO_MODELS.items())
    add("--model", f"checkpoint directory (HF or Mistral consolidated layout), or a demo name ({demos})")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML file of settings (flags override it)")
    add("--host", "bind address (0.0.0.0 inside a container)")
    add("--port", "port")
    add("--served-model-name", "model id, then aliases", nargs="+", metavar="NAME")
    add("--api-key", "accepted bearer key (repeatable)", action="append", metavar="KEY")
    add("--dtype", "weights and activations")
    add("--device", "cpu, cuda or cuda:N")
    add("--quantization", "8-bit expert weights (8bit: fp8 on Ada/Hopper, int8 elsewhere)")
    add("--kernels", "auto: Triton on CUDA, torch on CPU")
    add("--cuda-graph-max-batch", "largest decode batch replayed from a CUDA graph; 0: none")
    add("--max-model-len", "tokens per sequence")
    add("--max-num-seqs", "sequences per step")
    add("--max-num-batched-tokens", "tokens per step (the chunked-prefill budget)")
    add("--block-size", "tokens per KV block")
    add("--kv-cache-memory-gb", "KV pool size in GiB; it wins over --gpu-memory-utilization")
    add(
        "--gpu-memory-utilization",
        "fraction of the GPU's total memory for weights, activations and the KV pool",
    )
    add("--tensor-parallel-size", "ranks (GPUs, or CPU processes) the model is split over: 1, 2, 4 or 8")
    flagged.append("expert_parallel")
    p.add_argument(
        "--expert-parallel",
        dest="expert_parallel",
        action="store_true",
        default=None,
        help="whole experts per rank instead of a slice of every expert (default: off)",
    )
    add("--default-temperature", "temperature of requests that set none")
    add("--log-level", "debug, info, warning or error")
    flagged.append("ui")
    p.add_argument(
        "--no-ui", dest="ui", action="store_false", default=None, help="no playground at /ui/ (default: on)"
    )
    p.epilog = _epilog(flagged)
    return p


def _epilog(flagged: list[str]) -> str:
    rest = [
        f"  {name} (default: {_default(name)})" for name in ServerSettings.model_fields if name not in flagged
    ]
    return "\n".join(
        [
            "Precedence: defaults < YAML file (--config) < MIXTRAL_<NAME> environment variables < flags.",
            "Settings without a flag (YAML keys or MIXTRAL_ variables):",
            *rest,
            "",
            f"Requests get 503 not_ready until the server logs '{READY_LINE} ...'.",
        ]
    )


def parse_args(argv: list[str] | None = None) -> tuple[dict, Path | None]:
    args = vars(_parser().parse_args(argv))
    return args, args.pop("config")


def main(argv: list[str] | None = None) -> None:
    flags, config = parse_args(argv)
    settings = load_settings(flags, config)
    from server.launch import serve  # torch and the web stack: only once the arguments are good

    serve(settings)
