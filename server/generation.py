"""Driving one request through the engine from a route: collecting, streaming, disconnects.

A client that goes away aborts its generation: a streaming response's generator is cancelled by
sse-starlette; a non-streaming request is watched for `http.disconnect` while it waits. A request
the engine fails is an HTTP error while nothing has been sent (`RequestFailedError`: 500, or 503
when it ran out of device memory). A stream is under way from its first output, of whichever
choice; after that a failure ends its choice with `finish_reason: "error"` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from engine.errors import RequestFailedError
from engine.outputs import Logprob, RequestOutput
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from server.engine_client import EngineClient
from server.errors import APIError

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


@dataclass
class ChoiceResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: tuple[Logprob | None, ...] | None = None


@dataclass
class Collected:
    choices: list[ChoiceResult]
    prompt_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


async def collect(
    request: Request,
    engine: EngineClient,
    prompt_ids: list[int],
    params: SamplingParams,
    request_id: str,
    context_ids: list[int],
) -> Collected:
    """Run a request to completion, aborting it if the client disconnects first."""
    result = Collected([ChoiceResult() for _ in range(params.n)], len(prompt_ids))

    async def consume() -> None:
        async for out in engine.generate(prompt_ids, params, request_id, context_ids):
            add_output(result.choices[out.index], check_failed(out))  # a failure aborts the others

    task = asyncio.create_task(consume())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()  # leaving `generate` aborts the request in the engine
                raise ClientDisconnected()
        task.result()  # re-raise what the engine raised
        return result
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def wait_watching(request: Request, futures) -> None:
    """Wait for every future (re-raising the first failure), aborting if the client leaves first.

    A stream's response starts only with its first token, and until then nothing else notices a
    client that gives up (say, while the request is queued behind others).
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


def check_failed(out: RequestOutput | None) -> RequestOutput | None:
    """`out`, unless it reports that the engine failed its choice: then `RequestFailedError`."""
    if out is not None and out.error is not None:
        raise RequestFailedError(out.error, out.error_code or "internal_error")
    return out


async def first_output(request: Request, outputs: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    """The first output of a stream, aborting the request if the client leaves while it waits or
    if that output is a failure (raised, so the response is a plain HTTP error)."""
    task = asyncio.ensure_future(anext(outputs, None))
    try:
        await wait_watching(request, [task])
        return check_failed(task.result())
    except RequestFailedError:
        await outputs.aclose()  # aborts the request's other choices
        raise
    finally:
        if not task.done():
            task.cancel()  # cancels `generate` where it waits, which aborts the request
            with contextlib.suppress(BaseException):
                await task


def add_output(choice: ChoiceResult, out: RequestOutput) -> None:
    choice.text += out.new_text
    choice.token_ids.extend(out.new_token_ids)
    choice.logprobs.extend(out.logprobs)
    if out.prompt_logprobs is not None:
        choice.prompt_logprobs = out.prompt_logprobs
    if out.finished:
        choice.finish_reason = finish_reason(out.finish_reason)
