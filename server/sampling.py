"""From API request fields to engine `SamplingParams`: defaults, aliases and limits in one place."""

from __future__ import annotations

from typing import Any

from engine.sampling_params import MAX_LOGIT_BIAS, InvalidSamplingParams, SamplingParams
from engine.structured import StructuredOutput
from server.errors import BadRequest
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.state import ServedModel


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    if not raw:
        return {}
    if len(raw) > MAX_LOGIT_BIAS:
        raise BadRequest(f"logit_bias: at most {MAX_LOGIT_BIAS} entries", param="logit_bias")
    try:
        return {int(k): float(v) for k, v in raw.items()}
    except ValueError:
        raise BadRequest("logit_bias keys must be token ids", param="logit_bias") from None


def _max_tokens(requested: int | None, prompt_len: int, model: ServedModel) -> int:
    """Omitted: the rest of the context window (API.md). Too large: the engine says so, with numbers."""
    if requested is None:
        rest = model.max_model_len - prompt_len
        if rest < 1:
            raise BadRequest(
                f"This model's maximum context length is {model.max_model_len} tokens. However, your "
                f"messages resulted in {prompt_len} tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        return rest
    return requested


def _common(
    req: ChatCompletionRequest | CompletionRequest,
    max_tokens: int | None,
    prompt_len: int,
    model: ServedModel,
) -> dict:
    """The fields both endpoints share, with API defaults and Mistral/OpenAI aliases resolved."""
    return {
        "n": req.n,
        "temperature": model.default_temperature if req.temperature is None else req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k or 0,
        "min_p": req.min_p or 0.0,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
        "logit_bias": _logit_bias(req.logit_bias),
        "seed": req.seed if req.seed is not None else req.random_seed,
        "max_tokens": _max_tokens(max_tokens, prompt_len, model),
        "min_tokens": req.min_tokens or 0,
        "stop": _stop(req.stop),
        "ignore_eos": req.ignore_eos,
    }


def chat_sampling_params(
    req: ChatCompletionRequest,
    prompt_len: int,
    model: ServedModel,
    structured: StructuredOutput | None = None,
    banned: tuple[int, ...] = (),
) -> SamplingParams:
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = None
    if req.logprobs:
        logprobs = req.top_logprobs or 0
    elif req.top_logprobs:
        raise BadRequest("top_logprobs requires logprobs: true", param="top_logprobs")
    end_of_turn = tuple(t for t in model.encoder.stop_token_ids if t != model.encoder.eos_id)
    return _build(
        **_common(req, max_tokens, prompt_len, model),
        logprobs=logprobs,
        stop_token_ids=end_of_turn,
        structured=structured,
        banned_token_ids=banned,
    )


def completion_sampling_params(req: CompletionRequest, prompt_len: int, model: ServedModel) -> SamplingParams:
    if req.best_of is not None and req.best_of != req.n:
        raise BadRequest("best_of other than n is not supported", param="best_of")
    if req.suffix:
        raise BadRequest("suffix (fill-in-the-middle) is not supported by this model", param="suffix")
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    return _build(
        **_common(req, req.max_tokens, prompt_len, model),
        logprobs=req.logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def _build(**fields: Any) -> SamplingParams:
    try:
        return SamplingParams(**fields)
    except InvalidSamplingParams as exc:
        raise BadRequest(str(exc), param=exc.param, code="invalid_value") from None
