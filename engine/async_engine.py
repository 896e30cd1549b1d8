"""The engine's asyncio face: `generate` is an async iterator; the engine steps in its own thread.

The event loop never runs model code. Requests and aborts reach the engine thread through a
command queue; each step's outputs come back in one `call_soon_threadsafe` call and are routed
to per-request asyncio queues. If the engine thread dies, every waiter gets `EngineDeadError`
at once and `is_healthy` turns false.

The engine is built (weights loaded) inside its thread, and all torch work stays there. This
matters on CPU: once two threads have run OpenMP regions, libgomp sees more managed threads
than cores and stops spin-waiting between regions, and every parallel op pays a futex wake-up.
Measured on 2 cores: a decode step of the small Mixtral took 10.9 ms with all torch work in
one thread, 20 ms when the model was loaded in another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

from engine.config import ENGINE_DEFAULTS
from engine.errors import (
    EngineDeadError,
    EngineNotReadyError,
    QueueTimeoutError,
    RequestStoppedError,
    SlowConsumerError,
)
from engine.llm_engine import Engine
from engine.outputs import EngineStats, RequestOutput, held_bytes
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from engine.structured import CompiledGrammar

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5  # the thread sleeps on an event; this only bounds how stale a shutdown check gets


@dataclass(frozen=True, slots=True)
class _Add:
    request_id: str
    prompt_ids: Sequence[int]
    params: SamplingParams
    context_ids: Sequence[int]
    grammar: CompiledGrammar | None


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True, eq=False)
class _Waiter:
    """One caller's request: its outputs not yet read, and about how many bytes they hold."""

    outputs: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    backlog: int = 0
    overflowed: bool = False  # aborted for its backlog: later outputs are dropped


class AsyncEngine:
    def __init__(
        self, build: Callable[[], Engine], max_backlog_bytes: int = ENGINE_DEFAULTS.stream_buffer_bytes
    ) -> None:
        """`max_backlog_bytes`: how much of a request's output may wait unread (a stream whose
        client stopped reading) before the request is aborted (`SlowConsumerError`)."""
        self._build = build
        self.max_backlog_bytes = max_backlog_bytes
        self.engine: Engine | None = None  # set by the engine thread once built
        self._ready = threading.Event()
        self._commands: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._queues: dict[str, _Waiter] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead_error: EngineDeadError | None = None
        self._stopped: RequestStoppedError | None = None  # set by stop_requests: no new requests
        self.step_hook: Callable[[], None] | None = None  # called before each step (fault injection)

    @property
    def is_healthy(self) -> bool:
        return self.dead_error is None and self._thread is not None and self._thread.is_alive()

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self.is_healthy

    async def wait_ready(self) -> Engine:
        """Wait until the engine is built; raises `EngineDeadError` if building it failed."""
        await asyncio.to_thread(self._ready.wait)
        if self.dead_error is not None or self.engine is None:
            raise self.dead_error or EngineDeadError("engine failed to start")
        return self.engine

    @property
    def num_active_requests(self) -> int:
        return len(self._queues)

    def stats(self) -> EngineStats:
        """A snapshot for metrics (read without locking: each field is one atomic read)."""
        engine = self.engine
        if engine is None:
            return EngineStats(0, 0, 0.0, 0, 0)
        sched = engine.scheduler
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            kv_cache_usage=sched.blocks.usage,
            num_preemptions=sched.num_preemptions,
            num_steps=engine.num_steps,
            num_retried_steps=engine.num_retried_steps,
            max_batch=sched.max_batch,
            batch_size_buckets=tuple(engine.batch_sizes.cumulative()),
            batch_size_sum=engine.batch_sizes.sum,
            block_size=sched.blocks.block_size,
            num_blocks=sched.blocks.num_blocks,
        )

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will call `generate`."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        context_ids: Sequence[int] = (),
    ) -> AsyncGenerator[RequestOutput, None]:
        """Outputs of every choice of the request as they are produced; ends when all finished.

        A structured request's grammar is compiled (off the engine thread, or found in the cache)
        before the request is queued. Raises `RequestRejected` (`InvalidStructuredOutput` for a
        `response_format` that cannot be enforced) before any work for a request that can never be served,
        `QueueTimeoutError` for one that waited past `max_queue_time_s` without starting, and
        `EngineDeadError` if the engine is (or dies while) serving it. Leaving the iteration
        early (a client disconnect cancels the task) aborts the request.
        """
        if self.dead_error is not None:
            raise self.dead_error
        if self._stopped is not None:
            raise RequestStoppedError(str(self._stopped))
        if self.engine is None or not self._ready.is_set():
            raise EngineNotReadyError("the engine is still starting")
        engine = self.engine
        engine.validate(prompt_ids, params)  # reads config only: safe from this thread
        grammar = None
        if params.structured is not None and engine.grammars is not None:
            grammar = await engine.grammars.compile(params.structured)
            if self._stopped is not None:  # the server began stopping while it compiled
                raise RequestStoppedError(str(self._stopped))
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        waiter = _Waiter()
        self._queues[request_id] = waiter
        if self.dead_error is not None:  # died between the first check and registration
            self._queues.pop(request_id, None)
            raise self.dead_error
        self._send(_Add(request_id, list(prompt_ids), params, list(context_ids), grammar))
        remaining = params.n
        try:
            while remaining:
                item = await waiter.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                waiter.backlog -= held_bytes(item)
                if item.finish_reason is FinishReason.QUEUE_TIMEOUT:  # dropped before any work
                    remaining = 0
                    raise QueueTimeoutError(item.error or "queue timeout", item.queue_time)
                remaining -= item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if remaining:
                self._send(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        self._send(_Abort(request_id))

    def stop_requests(self, error: RequestStoppedError) -> int:
        """End every request now, and every one that arrives later (the server is stopping): each
        waiter gets `error` after what it already has, and the engine drops them (their KV blocks
        are freed). Returns how many were running."""
        self._stopped = error
        for request_id, waiter in self._queues.items():
            waiter.outputs.put_nowait(RequestStoppedError(str(error)))
            self._send(_Abort(request_id))
        return len(self._queues)

    def _send(self, command: _Add | _Abort) -> None:
        self._commands.put(command)
        self._wake.set()

    def _run(self) -> None:
        try:
            self.engine = engine = self._build()
            self._ready.set()
            while not self._stopping:
                engine.check_ranks()
                self._drain_commands(engine)
                if not engine.has_work:
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                if self.step_hook is not None:
                    self.step_hook()
                outputs = engine.step()
                if outputs:
                    self._deliver_threadsafe(outputs)
        except BaseException as exc:
            logger.exception("engine loop died")
            self.dead_error = EngineDeadError(f"engine loop died: {type(exc).__name__}: {exc}"[:300])
            self._ready.set()  # release anyone waiting for a start that will never come
            self._deliver_threadsafe(self.dead_error)
        finally:
            if self.engine is not None:
                self.engine.close(failed=self.dead_error is not None)

    def _drain_commands(self, engine: Engine) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Abort):
                engine.abort(command.request_id)
            elif command.request_id in self._queues:  # not already abandoned by its caller
                try:
                    engine.add_request(
                        command.request_id,
                        command.prompt_ids,
                        command.params,
                        command.context_ids,
                        grammar=command.grammar,
                    )
                except Exception as exc:
                    self._deliver_threadsafe({command.request_id: exc})

    def _deliver_threadsafe(
        self, payload: list[RequestOutput] | BaseException | dict[str, Exception]
    ) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._deliver, payload)

    def _deliver(self, payload: list[RequestOutput] | BaseException | dict[str, Exception]) -> None:
        """Runs on the event loop: route outputs (or errors) to the waiting requests."""
        if isinstance(payload, BaseException):
            for each in self._queues.values():
                each.outputs.put_nowait(payload)
            return
        if isinstance(payload, dict):
            for rid, exc in payload.items():
                if rid in self._queues:
                    self._queues[rid].outputs.put_nowait(exc)
            return
        for out in payload:
            waiter = self._queues.get(out.request_id)
            if waiter is None or waiter.overflowed:
                continue
            size = held_bytes(out)
            if waiter.backlog + size > self.max_backlog_bytes:  # its reader stopped: stop the request
                waiter.overflowed = True
                message = f"more than {self.max_backlog_bytes} bytes of output left unread"
                waiter.outputs.put_nowait(SlowConsumerError(message))
                self._send(_Abort(out.request_id))
                logger.warning("request %s aborted: %s", out.request_id, message)
                continue
            waiter.backlog += size
            waiter.outputs.put_nowait(out)
