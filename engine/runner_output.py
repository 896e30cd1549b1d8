"""What a model step hands the engine: the sampled tokens and their logprobs, by sequence. No torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The log-probability of one chosen token under the raw model distribution."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely under the model
    top: tuple[tuple[int, float], ...]  # top-k alternatives (token id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    sampled: dict[str, int]  # request id -> token
    logprobs: dict[str, TokenLogprob]  # for requests that asked for them
    prompt_logprobs: dict[str, list[TokenLogprob]]  # request id -> entries for this chunk's targets
