"""Iteration-level scheduling: one rule for prefill, chunked prefill and decode.

Each step, every scheduled request's computed tokens catch up with its total tokens as far as a
per-step token budget allows: a new prompt is computed whole or in chunks, a running sequence
computes the one token it sampled last step. Running requests go first (in admission order);
when the KV pool runs out, the most recently admitted running request is preempted (its blocks
freed, to be recomputed later); waiting requests are admitted while blocks, budget and
`max_num_seqs` last. Plain Python, no torch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """What one request computes this step (a snapshot: the runner must not see later changes)."""

    request: Request
    token_ids: tuple[int, ...]  # tokens computed this step
    num_computed: int  # tokens already in the cache
    block_ids: tuple[int, ...]
    sample: bool  # the chunk reaches the last known token, so a new token is sampled


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Request, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class Scheduler:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.blocks = BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Most requests running (so scheduled) in one step: max_num_seqs, unless the engine lowers
        # it after batched forwards keep failing at some size (see Engine._note_batch_fault).
        self.max_batch = config.max_num_seqs

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._make_room(request, n, preempted):
                break  # the request itself was preempted: it was the last one running
            chunks.append(self._chunk(request, n))
            budget -= n
            i += 1
        if not preempted:
            budget = self._admit(budget, chunks)
        return SchedulerOutput(tuple(chunks), tuple(preempted))

    def _make_room(self, request: Request, n: int, preempted: list[Request]) -> bool:
        """Preempt from the tail until `request` fits `n` more tokens; False if it went itself."""
        need = request.num_computed_tokens + n
        while not self.blocks.can_allocate(request, need):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        self.blocks.allocate(request, need)
        return True

    def _admit(self, budget: int, chunks: list[ScheduledChunk]) -> int:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_batch:
            request = self.waiting.popleft()
            if request.wait_for is not None and not self._sibling_ready(request.wait_for):
                skipped.append(request)  # n > 1: let the first choice cache the prompt
                continue
            # Prompt logprobs need every prompt position computed, so such a request skips the cache.
            wants_prompt_logprobs = request.params.prompt_logprobs is not None
            cached = [] if wants_prompt_logprobs else self.blocks.find_cached_prefix(request)
            num_cached = len(cached) * self.config.block_size
            n = min(request.num_tokens - num_cached, budget)
            if not self.blocks.can_allocate(request, num_cached + n, cached):
                self.waiting.appendleft(request)
                break
            self.blocks.allocate(request, num_cached + n, cached)
            request.num_computed_tokens = num_cached
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            chunks.append(self._chunk(request, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return budget

    @staticmethod
    def _sibling_ready(sibling: Request) -> bool:
        return sibling.prompt_computed or sibling.is_finished

    def _chunk(self, request: Request, n: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(
            request=request,
            token_ids=tuple(request.token_ids[start : start + n]),
            num_computed=start,
            block_ids=tuple(request.block_ids),
            sample=start + n == request.num_tokens,
        )

    def overdue(self, now: float, max_wait: float) -> list[Request]:
        """Waiting requests that never ran and arrived more than `max_wait` seconds before `now`.

        A later choice of an n > 1 request (it waits for its sibling) is never overdue by itself.
        """
        return [
            r
            for r in self.waiting
            if r.first_scheduled_time is None and r.wait_for is None and now - r.arrival_time > max_wait
        ]

    def set_max_batch(self, cap: int) -> list[Request]:
        """Run at most `cap` requests from now on; the latest admitted beyond it are requeued
        (KV dropped, to be recomputed). Returns those."""
        self.max_batch = cap
        excess = self.running[cap:]
        self.requeue(excess)
        return excess

    def requeue(self, requests: Iterable[Request]) -> None:
        """Preempt running `requests` (their KV is dropped, recomputed when readmitted), keeping
        their admission order at the front of the queue."""
        for request in sorted(requests, key=self.running.index, reverse=True):
            self.running.remove(request)
            self._preempt(request)

    def _preempt(self, request: Request) -> None:
        self.blocks.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed tokens, append sampled tokens, apply token-level stops.

        `sampled` maps request ids to the token sampled for chunks with `sample` set; a request
        missing from it (failed this step) is left for the caller to finish. Returns the
        requests that finished in this update.
        """
        finished: list[Request] = []
        for chunk in output.chunks:
            request = chunk.request
            if request.is_finished:  # aborted while the step ran
                continue
            request.num_computed_tokens += len(chunk.token_ids)
            self.blocks.cache_full_blocks(request)
            if not chunk.sample or request.request_id not in sampled:
                continue
            request.append_token(sampled[request.request_id])
            reason = request.check_stop()
            if reason is not None:
                self.finish(request, reason)
                finished.append(request)
        return finished

    def finish(self, request: Request, reason: FinishReason) -> None:
        """End `request` (any state) and return its blocks to the pool at once."""
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.blocks.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
