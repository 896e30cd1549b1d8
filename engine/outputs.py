"""What the engine hands back, step by step, for each choice of each request. Plain Python."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from engine.errors import ErrorCode
from engine.request import FinishReason


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


# What an output holds in CPython, roughly (measured with tracemalloc, CPython 3.11): the object
# with a short text, and each logprob entry (the chosen token's or an alternative's).
OUTPUT_BYTES = 250
LOGPROB_BYTES = 240


def held_bytes(out: RequestOutput) -> int:
    """About how much memory `out` holds while it waits to be read."""
    entries = sum(1 + len(lp.top) for lp in out.logprobs)
    return OUTPUT_BYTES + len(out.new_text.encode("utf-8", "replace")) + LOGPROB_BYTES * entries


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


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's state, for metrics."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use
    num_preemptions: int
    num_steps: int
    num_retried_steps: int = 0  # steps whose forward failed and was retried one request at a time
    max_batch: int = 0  # most sequences per step now (max_num_seqs unless lowered after faults)
    batch_size_buckets: tuple[tuple[str, int], ...] = ()  # cumulative (upper bound, steps)
    batch_size_sum: int = 0
    block_size: int = 0  # tokens per KV block (0 before the engine is built)
    num_blocks: int = 0  # blocks in the KV pool
