"""A request's state as the scheduler sees it. Plain Python: no torch here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # the client went away or the request was cancelled
    ERROR = "error"  # serving this request failed; the others go on
    QUEUE_TIMEOUT = "queue_timeout"  # waited longer than the configured bound before any work


@dataclass(slots=True, eq=False)
class Request:
    """One sequence being generated (a choice of an `n > 1` request is a Request of its own).

    Invariant while running: `num_computed_tokens < num_tokens`; the gap is what the next step
    computes (the whole prompt, a chunk of it, or the one token sampled last step).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None
    max_model_len: int
    arrival_time: float = 0.0
    index: int = 0  # choice index within its client request
    parent_id: str | None = None  # the client's request id when n > 1
    wait_for: Request | None = None  # a sibling whose prompt must be cached first (n > 1)
    token_ids: list[int] = field(init=False)  # prompt + output, appended in place
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of the full blocks so far
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    num_preemptions: int = 0
    num_oom_retries: int = 0  # steps of this request that ran out of device memory
    first_scheduled_time: float | None = None  # monotonic time of its first step (queue time ends)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def prompt_computed(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def check_stop(self) -> FinishReason | None:
        """Token-level stop rules after a token was appended (stop strings are the detokenizer's)."""
        last = self.token_ids[-1]
        out = self.num_output_tokens
        if out >= self.params.min_tokens:
            if last == self.eos_token_id and not self.params.ignore_eos:
                self.stop_reason = None
                return FinishReason.STOP
            if last in self.params.stop_token_ids:
                self.stop_reason = last
                return FinishReason.STOP
        if out >= self.params.max_tokens or self.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
