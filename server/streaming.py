"""One request's generation, from a route to the engine and back, streamed or collected.

Both completion routes run through here; they only map requests in and deltas out.
- A request is k prompts x n choices: each prompt runs as an engine request of its own, all at
  once, and choice `i` of prompt `p` is choice `p * n + i` of the response.
- Until something has been sent, a failure is a plain HTTP error: the engine refusing a request
  (400), failing it (500, or 503 out of memory) or timing it out in the queue (503). So a stream
  starts (`Generation.start`) only once every prompt has produced its first output.
- A client that leaves aborts every prompt: while a request waits (its connection is polled) or
  mid-stream (sse-starlette cancels the stream, which closes the generation).
- Once a stream is under way, a choice the engine fails ends in-band with `finish_reason:
  "error"`, and an exception ends every unfinished choice so; the stream stays parseable.
- Usage: Mistral style by default, on the chunk that ends the last choice; with
  `stream_options.include_usage` OpenAI style, a chunk of its own before `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import Request

from engine.errors import RequestFailedError
from engine.outputs import Logprob, RequestOutput
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from server.access_log import request_record
from server.engine_client import EngineClient
from server.errors import APIError
from server.protocol import UsageInfo

logger = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 0.25


class ClientDisconnected(APIError):
    """The client left before the answer: an expected outcome, not a server error (no traceback)."""

    status = 499  # nginx's "client closed request"; nobody reads it, but the access log shows it
    type = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("The client closed the request", code="client_disconnected")


def finish_reason(reason: FinishReason | None) -> str | None:
    """API names; the context window also reports `length` (API.md: never `model_length`)."""
    if reason is None:
        return None
    return {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}.get(reason, "error")


def usage(prompt: int, completion: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt of a request, as the engine takes it."""

    ids: list[int]
    params: SamplingParams
    context_ids: list[int]  # what the reply continues (seeds detokenization)


@dataclass(frozen=True, slots=True)
class Delta:
    """What one engine output adds to one choice. Text now; tool calls will be deltas too."""

    index: int  # the choice in the response: prompt * n + choice
    prompt: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[Logprob, ...]
    prompt_logprobs: tuple[Logprob | None, ...] | None  # on a choice's first delta, when asked for
    finish_reason: str | None  # set on the choice's last delta ("error" if the engine failed it)
    failure: RequestFailedError | None = None  # why the engine failed the choice


@dataclass
class Choice:
    """A choice collected whole (no stream)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: tuple[Logprob | None, ...] | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


class Generation:
    """The prompts of one request running in the engine, as deltas of their choices."""

    def __init__(
        self, engine: EngineClient, request: Request, prompts: Sequence[Prompt], request_ids: Sequence[str]
    ) -> None:
        """Each of `prompts` runs as the engine request of the same place in `request_ids`, for the
        HTTP `request` (watched for a client that leaves; its access-log record is kept here)."""
        self.n = prompts[0].params.n
        self.request = request
        self._outputs = [
            engine.generate(p.ids, p.params, rid, p.context_ids)
            for rid, p in zip(request_ids, prompts, strict=True)
        ]
        self._next: dict[asyncio.Future, int] = {}  # each prompt's pending output -> the prompt
        self.unfinished = set(range(len(prompts) * self.n))
        self.record = request_record(request.scope, len(self.unfinished))
        self.record.prompt_tokens = sum(len(p.ids) for p in prompts)
        self._served = False  # its outputs began to reach the client (not refused at the start)

    def usage(self) -> UsageInfo:
        return usage(self.record.prompt_tokens, self.record.completion_tokens)

    async def start(self) -> None:
        """Wait for every prompt's first output, raising what the engine raised or failed (so it
        is a plain HTTP error) and aborting if the client leaves meanwhile."""
        self._await_next(range(len(self._outputs)))
        try:
            await _wait_watching(self.request, self._next)
            for future in self._next:
                _check_failed(future.result())
        except BaseException:
            await self.close()
            raise
        self._served = True

    async def deltas(self) -> AsyncIterator[Delta]:
        """Every choice's deltas as they come, interleaved; after `start`."""
        while self._next:
            done, _ = await asyncio.wait(self._next, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=self._next.__getitem__):
                k = self._next.pop(future)
                out = future.result()
                if out is None:
                    continue  # every choice of that prompt has finished
                self._await_next([k])
                yield self._delta(k, out)

    async def collect(self) -> list[Choice]:
        """Run to the end, no stream: a choice the engine fails fails the request
        (`RequestFailedError`, aborting the others); a client that leaves aborts it."""
        choices = [Choice() for _ in self.unfinished]

        async def consume() -> None:
            self._served = True
            self._await_next(range(len(self._outputs)))
            async for delta in self.deltas():
                if delta.failure is not None:
                    raise delta.failure
                choices[delta.index].add(delta)

        task = asyncio.create_task(consume())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if not task.done() and await self.request.is_disconnected():
                    raise ClientDisconnected()
            task.result()  # what the engine raised
            return choices
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await self.close()

    async def close(self) -> None:
        """Abort whatever still runs (leaving an engine stream aborts its request); the access log
        says `abort` for the choices of a served request that did not finish."""
        if self._served:
            for index in self.unfinished:
                self.record.finish_reasons[index] = self.record.finish_reasons[index] or "abort"
        for future in self._next:
            future.cancel()
        await asyncio.gather(*self._next, return_exceptions=True)
        self._next.clear()
        for outputs in self._outputs:
            await outputs.aclose()

    def _await_next(self, prompts: Iterable[int]) -> None:
        for k in prompts:
            self._next[asyncio.ensure_future(anext(self._outputs[k], None))] = k

    def _delta(self, k: int, out: RequestOutput) -> Delta:
        record = self.record
        record.completion_tokens += len(out.new_token_ids)
        if record.queue_time_s is None and out.queue_time is not None:
            record.queue_time_s = out.queue_time
        if record.ttft_s is None and out.new_token_ids:
            record.ttft_s = time.monotonic() - record.start
        index = k * self.n + out.index
        reason, failure = None, None
        if out.finished:
            self.unfinished.discard(index)
            reason = "error" if out.error else finish_reason(out.finish_reason)
            record.finish_reasons[index] = reason
        if out.error is not None:
            failure = RequestFailedError(out.error, out.error_code or "internal_error")
        return Delta(
            index, k, out.new_text, out.new_token_ids, out.logprobs, out.prompt_logprobs, reason, failure
        )


class StreamFormat(Protocol):
    """How a route spells its stream's chunks (each the JSON of one `data:` line)."""

    def opening(self) -> list[str]:
        """Chunks before any delta (chat: a role chunk per choice)."""
        ...

    def delta(self, delta: Delta, usage: UsageInfo | None) -> str | None:
        """The chunk of a delta (None: nothing worth sending); `usage` rides on it when given."""
        ...

    def failed(self, index: int) -> str:
        """The chunk that ends choice `index` in-band with `finish_reason: "error"`."""
        ...

    def usage_only(self, usage: UsageInfo) -> str:
        """OpenAI's usage chunk: no choices."""
        ...


async def stream_events(
    generation: Generation, fmt: StreamFormat, include_usage: bool, request_id: str
) -> AsyncIterator[str]:
    """The `data:` payloads of a started generation, ending with `[DONE]`."""
    for opening in fmt.opening():
        yield opening
    try:
        async for delta in generation.deltas():
            last = not generation.unfinished and not include_usage
            chunk = fmt.delta(delta, generation.usage() if last else None)
            if chunk is not None:
                yield chunk
    except Exception as exc:  # after the first byte: report in-band, the stream stays parseable
        logger.warning("stream %s failed: %s", request_id, type(exc).__name__)
        for index in sorted(generation.unfinished):
            generation.record.finish_reasons[index] = "error"
            yield fmt.failed(index)
    finally:
        await generation.close()  # a cancelled stream (client gone) aborts the request here
    if include_usage:
        yield fmt.usage_only(generation.usage())
    yield "[DONE]"


async def _wait_watching(request: Request, futures: Iterable[asyncio.Future]) -> None:
    """Wait for every future (re-raising the first failure), aborting if the client leaves first.

    A stream's response starts only with its first outputs, and until then nothing else notices
    a client that gives up (say, while the request is queued behind others).
    """
    pending = set(futures)
    while pending:
        done, pending = await asyncio.wait(
            pending, timeout=_DISCONNECT_POLL_S, return_when=asyncio.FIRST_EXCEPTION
        )
        for future in done:
            future.result()
        if pending and await request.is_disconnected():
            raise ClientDisconnected()


def _check_failed(out: RequestOutput | None) -> None:
    """Raise `RequestFailedError` if `out` reports that the engine failed its choice."""
    if out is not None and out.error is not None:
        raise RequestFailedError(out.error, out.error_code or "internal_error")
