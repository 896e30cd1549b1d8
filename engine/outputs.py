"""What the engine hands back, step by step, for each choice of each request. Plain Python."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal

from engine.request import FinishReason

# Why a request failed: its forward or post-processing raised; it kept running out of device
# memory (worth retrying later); it waited too long for a slot and was never started.
ErrorCode = Literal["internal_error", "out_of_memory", "queue_timeout"]


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    token: str  # the token's text as it would appear in the output
    bytes: tuple[int, ...]  # its UTF-8 bytes (a lone byte-fallback token has one byte)
    logprob: float


@dataclass(frozen=True, slots=True)
class Logprob:
    """The logprob of one chosen (or prompt) token and its top alternatives."""

    token_id: int
    token: str
    bytes: tuple[int, ...]
    logprob: float
    rank: int
    top: tuple[TopLogprob, ...]


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """New tokens and text of one choice since the last output; the last one has `finished` set."""

    request_id: str  # the client's request id
    index: int  # the choice, 0 .. n - 1
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    stop_reason: str | int | None  # the stop string or stop token id that ended it
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    logprobs: tuple[Logprob, ...] = ()  # one per new token, when requested
    prompt_logprobs: tuple[Logprob | None, ...] | None = None  # on the first output; None for token 0
    error: str | None = None  # set when finish_reason is ERROR or QUEUE_TIMEOUT (for logs, not clients)
    error_code: ErrorCode | None = None  # set with `error`
    queue_time: float | None = None  # seconds from arrival to its first step (or to its queue timeout)


class StepHistogram:
    """Counts of a per-step quantity (sequences in the batch) in fixed buckets, for metrics."""

    def __init__(self, buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bucket
        self.sum = 0

    def observe(self, value: int) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus histogram buckets: (upper bound, observations <= it), ending with +Inf."""
        total, out = 0, []
        for bound, count in zip([*(str(float(b)) for b in self.buckets), "+Inf"], self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class EngineError(RuntimeError):
    """Base of the engine's typed errors."""


class RequestRejected(EngineError, ValueError):
    """A request the engine can never serve (too long for the context or the KV pool)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class EngineDeadError(EngineError):
    """The engine loop stopped; no request can be served until the process restarts."""


class QueueTimeoutError(EngineError):
    """The request waited longer than the configured bound and was dropped before any work."""

    def __init__(self, message: str, waited: float | None = None) -> None:
        super().__init__(message)
        self.waited = waited  # seconds it spent in the queue


class RequestFailedError(EngineError):
    """Serving one request failed (the engine goes on serving the others)."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code
