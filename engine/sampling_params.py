"""How a request wants its tokens chosen and when it wants to stop. Plain Python, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.structured.spec import StructuredOutput

# Fan-out bounds (RELIABILITY.md item 9): a request cannot make the engine do unbounded work.
MAX_N = 16
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300
MAX_LOGPROBS = 20


class InvalidSamplingParams(ValueError):
    """A sampling parameter is out of range; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling and stopping rules of one request (all choices of an `n > 1` request share them)."""

    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per sampled token (0: only the sampled one)
    prompt_logprobs: int | None = None  # same, for every prompt token after the first
    structured: StructuredOutput | None = None  # a grammar the output must match (response_format)
    banned_token_ids: tuple[int, ...] = ()  # never sampled (the server's: a tool token with no tools)

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1, MAX_N)
        _check_float("temperature", self.temperature, 0.0, 2.0)
        _check_float("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0.0:
            raise InvalidSamplingParams("top_p", "must be greater than 0")
        _check_int("top_k", self.top_k, 0, 1 << 30)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.01, 10.0)
        _check_int("max_tokens", self.max_tokens, 1, 1 << 30)
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        if self.seed is not None:
            _check_int("seed", self.seed, -(1 << 63), (1 << 64) - 1)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidSamplingParams("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        for s in self.stop:
            if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_CHARS:
                raise InvalidSamplingParams(
                    "stop", f"stop strings must have 1 to {MAX_STOP_STRING_CHARS} characters"
                )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidSamplingParams("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
        if len(self.banned_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidSamplingParams("banned_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidSamplingParams("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
        for token, bias in self.logit_bias.items():
            _check_int("logit_bias", token, 0, 1 << 31)
            _check_float("logit_bias", bias, -100.0, 100.0)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 0, MAX_LOGPROBS)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSamplingParams(name, f"must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidSamplingParams(name, f"must be between {lo} and {hi}, got {value}")


def _check_float(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSamplingParams(name, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidSamplingParams(name, f"must be a finite number between {lo} and {hi}, got {value}")
