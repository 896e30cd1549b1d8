"""`mixtral-server` / `python -m server`: parse settings, start the engine, serve HTTP.

The engine is built in its own thread (weights load there; see engine/async_engine.py) while
the server already answers liveness; readiness turns 200 after the warm-up forward. SIGTERM
drains: readiness goes 503 at once, new requests get 503 `shutting_down`, in-flight ones finish
(up to `drain_timeout_s`), then the process exits 0. A dead engine exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import subprocess
import sys
from pathlib import Path

import uvicorn

from engine.async_engine import AsyncEngine
from engine.factory import EngineInfo, EngineSpec, build_engine
from server.app import create_app
from server.metrics import MeteredEngine, Metrics
from server.settings import ServerSettings, load_settings
from server.state import AppState, ServedModel
from tokenization import load_prompt_encoder

logger = logging.getLogger("mixtral_server")
_GIB = 1024**3


def parse_args(argv: list[str] | None = None) -> tuple[dict, Path | None]:
    p = argparse.ArgumentParser(
        prog="mixtral-server", description="Serve Mixtral behind the Mistral/OpenAI API"
    )
    p.add_argument("--model", help="checkpoint directory (HF or Mistral consolidated layout)")
    p.add_argument("--config", type=Path, help="YAML file of settings (flags override it)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--served-model-name", nargs="+", dest="served_model_name", help="model id, then aliases")
    p.add_argument("--api-key", action="append", dest="api_key", help="accepted bearer key (repeatable)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device")
    p.add_argument("--quantization", choices=["none", "8bit", "int8", "fp8"], help="8-bit expert weights")
    p.add_argument("--kernels", choices=["auto", "torch", "triton"])
    p.add_argument("--cuda-graph-max-batch", type=int, help="largest decode batch replayed from a CUDA graph")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--kv-cache-memory-gb", type=float)
    p.add_argument("--default-temperature", type=float)
    p.add_argument("--log-level")
    args = vars(p.parse_args(argv))
    return args, args.pop("config")


DEMOS = {
    "demo": ("dense", "SmolLM2-135M-Instruct (demo model: a small real chat model, not Mixtral)"),
    "demo-moe": ("moe", "SmolLM2-135M-Instruct upcycled to 8 experts, top-2 (MoE path demo, not Mixtral)"),
}


def resolve_model(settings: ServerSettings) -> tuple[Path, str | None]:
    """The checkpoint directory, converting the demo model first when asked for (or by default).

    The conversion runs in a child process so this process's threads never touch torch before
    the engine thread does (see engine/async_engine.py).
    """
    name = settings.model or "demo"
    if name not in DEMOS:
        return Path(name), None
    kind, description = DEMOS[name]
    done = subprocess.run([sys.executable, "-m", "model.demo", kind], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mixtral-server: could not prepare the demo model:\n{done.stderr.strip()[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1]), description


def served_model(settings: ServerSettings, model_dir: Path, description: str | None) -> ServedModel:
    names = settings.served_model_name or [model_dir.name]
    return ServedModel(
        name=names[0],
        aliases=tuple(names[1:]),
        encoder=load_prompt_encoder(model_dir),
        max_model_len=settings.max_model_len or 0,  # replaced once the engine knows its pool size
        default_temperature=settings.default_temperature,
        description=description or f"{names[0]} served by mixtral-server from {model_dir.name}",
    )


class ProgressBar:
    """A plain progress line on stderr while weights load."""

    def __init__(self) -> None:
        self._last = -1

    def __call__(self, done: int, total: int) -> None:
        pct = int(100 * done / max(total, 1))
        if pct != self._last:
            self._last = pct
            bar = "#" * (pct // 4)
            sys.stderr.write(f"\rloading weights [{bar:<25}] {pct:3d}% of {total / _GIB:.2f} GiB")
            if pct == 100:
                sys.stderr.write("\n")
            sys.stderr.flush()


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM/SIGINT first drain in-flight requests (stock uvicorn stops at once)."""

    def __init__(self, config: uvicorn.Config, state: AppState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self._draining: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:  # called by uvicorn's signal handler
        if self._draining is not None:  # a second signal: stop now
            return super().handle_exit(sig, frame)
        self.state.shutting_down = True
        self._draining = asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout_s
        while self.state.engine.num_active_requests and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.should_exit = True


def build_app(settings: ServerSettings):
    model_dir, description = resolve_model(settings)
    model = served_model(settings, model_dir, description)
    spec = EngineSpec(
        model_dir=model_dir,
        dtype=settings.dtype,
        device=settings.device,
        quantization=settings.quantization,
        kernels=settings.kernels,
        cuda_graph_max_batch=settings.cuda_graph_max_batch,
        max_queue_time_s=settings.max_queue_time_s or None,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        block_size=settings.block_size,
        kv_cache_bytes=int(settings.kv_cache_memory_gb * _GIB),
        enable_prefix_caching=settings.enable_prefix_caching,
        seed=settings.seed,
    )
    info: dict[str, EngineInfo] = {}

    def build():
        engine, info["engine"] = build_engine(spec, model.encoder, ProgressBar())
        return engine

    engine = AsyncEngine(build)
    metered = MeteredEngine(engine, Metrics(engine))  # every request is measured here
    limit = settings.max_num_seqs + settings.max_waiting_requests
    state = AppState(model=model, engine=metered, max_active_requests=limit)
    app = create_app(state, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        watcher = asyncio.create_task(announce(state, settings, info))
        yield
        watcher.cancel()
        await engine.shutdown()

    app.router.lifespan_context = lifespan
    return app, state


async def announce(state: AppState, settings: ServerSettings, info: dict[str, EngineInfo]) -> None:
    """Log the startup line once the engine is ready; exit non-zero if it dies."""
    engine = state.engine
    try:
        built = await engine.wait_ready()
    except Exception as exc:
        logger.error("engine failed to start: %s", exc)
        state.stop_server()
        return
    i = info["engine"]
    state.model = state.model.__class__(
        **{**state.model.__dict__, "max_model_len": built.config.max_model_len}
    )
    logger.info(
        "serving %s%s [%s] on http://%s:%d (%s, %s): weights %.2f GiB, KV cache %.2f GiB (%d tokens), "
        "context %d tokens, loaded in %.1f s",
        state.model.name,
        f" (aliases: {', '.join(state.model.aliases)})" if state.model.aliases else "",
        state.model.description,
        settings.host, settings.port, settings.device, settings.dtype or "checkpoint dtype",
        i.weights_bytes / _GIB, i.kv_cache_bytes / _GIB, i.kv_tokens, i.max_model_len, i.load_seconds,
    )  # fmt: skip
    while engine.is_healthy:
        await asyncio.sleep(1.0)
    logger.error("engine died: %s; exiting so the orchestrator restarts us", engine.dead_error)
    state.stop_server()


def main(argv: list[str] | None = None) -> None:
    flags, config = parse_args(argv)
    settings = load_settings(flags, config)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app, state = build_app(settings)
    config_ = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False
    )
    server = DrainingServer(config_, state, settings.drain_timeout_s)
    state.stop_server = lambda: setattr(server, "should_exit", True)
    server.run()
    if getattr(state.engine, "dead_error", None) is not None:
        sys.exit(3)
