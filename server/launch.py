"""Serving from settings: prepare the model, start the engine, serve HTTP until told to stop.

The engine is built in its own thread (weights load there; see engine/async_engine.py) while
the server already answers liveness; readiness turns 200 after the warm-up forward. SIGTERM
drains: readiness goes 503 at once, new requests get 503 `shutting_down`, in-flight ones finish
(up to `drain_timeout_s`), then the process exits 0. A dead engine exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI

from engine.async_engine import AsyncEngine
from engine.errors import RequestStoppedError
from engine.factory import EngineInfo, build_engine
from engine.llm_engine import Engine
from server.app import create_app
from server.metrics import MeteredEngine, Metrics
from server.settings import DEFAULT_MODEL, DEMO_MODELS, READY_LINE, ServerSettings
from server.state import Admission, AppState, ServedModel
from tokenization import load_prompt_encoder
from tokenization.prompt_encoder import PromptEncoder

logger = logging.getLogger("mixtral_server")
_GIB = 1024**3
# After the drain: how long the ended requests get to send their last bytes, then how long uvicorn
# waits for connections to close before it closes them.
FLUSH_S = 2.0
SHUTDOWN_GRACE_S = 5


def resolve_model(settings: ServerSettings) -> tuple[Path, str | None]:
    """The checkpoint directory, converting the demo model first when asked for (or by default).

    The conversion runs in a child process so this process's threads never touch torch before
    the engine thread does (see engine/async_engine.py). Its progress goes to our stderr; its
    stdout is the converted checkpoint's path.
    """
    name = settings.model or DEFAULT_MODEL
    if name not in DEMO_MODELS:
        return Path(name), None
    kind, description = DEMO_MODELS[name]
    done = subprocess.run([sys.executable, "-m", "model.demo", kind], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit("mixtral-server: could not prepare the demo model (the error is above)")
    return Path(done.stdout.strip().splitlines()[-1]), description


def served_model(
    settings: ServerSettings,
    model_dir: Path,
    description: str | None,
    encoder: PromptEncoder,
    max_model_len: int,
) -> ServedModel:
    names = settings.served_model_name or [model_dir.name]
    return ServedModel(
        name=names[0],
        aliases=tuple(names[1:]),
        encoder=encoder,
        max_model_len=max_model_len,
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
    """uvicorn, but SIGTERM/SIGINT first drain in-flight requests (stock uvicorn stops at once).

    Up to `drain_timeout_s` the requests in flight go on. Whatever is left then is ended: a stream
    with `finish_reason: "error"` and `[DONE]`, a waiting request with 503 `shutting_down`; they
    get FLUSH_S to be sent. uvicorn then waits at most SHUTDOWN_GRACE_S for connections to close
    (a client that stopped reading keeps its own open), and the process exits 0. A second signal
    stops at once. All of it fits Docker's `stop_grace_period` (docker-compose.yml).
    """

    def __init__(self, config: uvicorn.Config, state: AppState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self._draining: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:  # called by uvicorn's signal handler
        if self._draining is not None:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.state.shutting_down = True
        self._draining = asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout_s
        while self.state.admission.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.state.admission.in_flight:
            error = RequestStoppedError(
                f"the server stopped: the request outlasted the {self.drain_timeout_s:g} s drain"
            )
            count = self.state.engine.stop_requests(error)
            logger.warning("drain timeout: ended %d requests still running", count)
            deadline = loop.time() + FLUSH_S
            while self.state.admission.in_flight and loop.time() < deadline:
                await asyncio.sleep(0.05)
        self.should_exit = True


def build_app(settings: ServerSettings) -> tuple[FastAPI, AppState]:
    model_dir, description = resolve_model(settings)
    encoder = load_prompt_encoder(model_dir)  # before the weights: a missing tokenizer fails fast
    args = settings.engine_args()
    info: dict[str, EngineInfo] = {}

    def build() -> Engine:
        engine, info["engine"] = build_engine(model_dir, args, encoder, ProgressBar())
        return engine

    engine = AsyncEngine(build, args.stream_buffer_bytes)
    metrics = Metrics(engine.stats, lambda: state.model.name if state.model is not None else None)
    admission = Admission(settings.max_num_seqs + settings.max_waiting_requests)
    # Every request is measured on its way through MeteredEngine.
    state = AppState(
        engine=MeteredEngine(engine, metrics),
        admission=admission,
        metrics=metrics,
        stall_timeout_s=settings.stream_stall_timeout_s,
    )
    app = create_app(state, settings)

    async def ready() -> None:
        """Serve once the engine is ready (exit non-zero if it fails to start or dies later)."""
        try:
            await engine.wait_ready()
        except Exception as exc:
            logger.error("engine failed to start: %s", exc)
            state.stop_server()
            return
        built = info["engine"]
        state.model = served_model(settings, model_dir, description, encoder, built.max_model_len)
        announce(state.model, settings, built)
        while engine.is_healthy:
            await asyncio.sleep(1.0)
        logger.error("engine died: %s; exiting so the orchestrator restarts us", engine.dead_error)
        state.stop_server()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        logger.info("loading %s; until it is ready, requests get 503 not_ready", model_dir)
        watcher = asyncio.create_task(ready())
        yield
        watcher.cancel()
        await engine.shutdown()

    app.router.lifespan_context = lifespan
    return app, state


def base_url(settings: ServerSettings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}"


def announce(model: ServedModel, settings: ServerSettings, info: EngineInfo) -> None:
    """What was loaded, then the one line that says the server takes requests (/ready is 200)."""
    kind = "expert" if settings.expert_parallel else "tensor"
    ranks = settings.tensor_parallel_size
    split = f" over {ranks} ranks ({kind} parallel)" if ranks > 1 else ""
    logger.info(
        "loaded %s [%s] (%s, %s)%s: weights %.2f GiB, KV cache %.2f GiB (%d tokens), "
        "context %d tokens, in %.1f s",
        model.name, model.description, settings.device, settings.dtype or "checkpoint dtype", split,
        info.weights_bytes / _GIB, info.kv_cache_bytes / _GIB, info.kv_tokens, info.max_model_len,
        info.load_seconds,
    )  # fmt: skip
    ids = ", ".join([model.name, *model.aliases])
    url = base_url(settings)
    # At the configured level or INFO, whichever is higher: `--log-level warning` still shows it.
    level = max(logging.INFO, logger.getEffectiveLevel())
    logger.log(level, "%s %s (OpenAI base URL %s/v1), model ids: %s", READY_LINE, url, url, ids)


def serve(settings: ServerSettings) -> None:
    """Run the server in this process until SIGTERM (exit 0) or a dead engine (exit 3)."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app, state = build_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = DrainingServer(config, state, settings.drain_timeout_s)
    state.stop_server = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.engine.dead_error is not None:
        sys.exit(3)
