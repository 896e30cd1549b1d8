"""Grammars compiled off the engine thread, into a bounded cache keyed by the spec.

The engine thread never waits for a compile: the async facade awaits `compile` before the request
is queued, so a request enters the scheduler only with its grammar ready. llguidance releases the
GIL while it builds a grammar. Concurrent requests for one new schema share one compile, which
goes on when one of them is cancelled (its client left). Failures are not cached (a bad schema
fails in about a millisecond).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from engine.structured.backend import CompiledGrammar, GrammarBackend
from engine.structured.spec import StructuredOutput

DEFAULT_CACHE_SIZE = 256


class GrammarCompiler:
    def __init__(self, backend: GrammarBackend, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.backend = backend
        self.cache_size = cache_size
        self._cache: OrderedDict[StructuredOutput, CompiledGrammar] = OrderedDict()
        self._pending: dict[StructuredOutput, Future[CompiledGrammar]] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self.num_compiled = 0

    @property
    def mask_words(self) -> int:
        return self.backend.mask_words

    def cached(self, spec: StructuredOutput) -> CompiledGrammar | None:
        with self._lock:
            return self._lookup(spec)

    def _lookup(self, spec: StructuredOutput) -> CompiledGrammar | None:
        grammar = self._cache.get(spec)
        if grammar is not None:
            self._cache.move_to_end(spec)
        return grammar

    def get(self, spec: StructuredOutput) -> CompiledGrammar:
        """The compiled grammar, waiting for (or doing, in this thread) its compile if not cached."""
        with self._lock:
            grammar = self._lookup(spec)
            future = self._pending.get(spec)
        if grammar is not None:
            return grammar
        return future.result() if future is not None else self._compile(spec)

    async def compile(self, spec: StructuredOutput) -> CompiledGrammar:
        """The compiled grammar; a compile runs in the compiler's thread, shared by concurrent callers.

        A caller that is cancelled while it waits leaves the compile running for the others.
        Raises `InvalidStructuredOutput` for a spec that cannot be enforced.
        """
        with self._lock:
            grammar = self._lookup(spec)
            if grammar is not None:
                return grammar
            future = self._pending.get(spec)
            started = future is None
            if future is None:
                future = self._pending[spec] = self._executor.submit(self._compile, spec)
        if started:
            # Outside the lock: a compile that already ended (a bad schema fails in about a
            # millisecond) runs the callback here at once, and the callback takes the lock.
            future.add_done_callback(lambda _: self._forget_pending(spec))
        return await asyncio.shield(asyncio.wrap_future(future))

    def _forget_pending(self, spec: StructuredOutput) -> None:
        with self._lock:
            self._pending.pop(spec, None)

    def _compile(self, spec: StructuredOutput) -> CompiledGrammar:
        grammar = self.backend.compile(spec)
        with self._lock:  # cached before the pending entry goes: no window for a second compile
            self.num_compiled += 1
            self._cache[spec] = grammar
            self._cache.move_to_end(spec)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
