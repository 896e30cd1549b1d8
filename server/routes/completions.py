"""POST /v1/completions: OpenAI's legacy text completion (prompt as text or token ids, echo, logprobs).

Choice `i` of prompt `p` has index `p * n + i`; the prompts run concurrently. Generated text
continues the prompt: its ids seed the detokenizer, so SentencePiece's leading space survives
(" is" after "The sky", not "is"). `text_offset` counts characters of the choice's `text`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, NamedTuple, cast

from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse

from engine.outputs import Logprob
from engine.sampling_params import SamplingParams
from server.deps import serving_state
from server.errors import BadRequest
from server.openapi import GENERATION_ERRORS, streamed_or_json
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    now,
)
from server.sampling import completion_sampling_params
from server.sse import event_stream, sse_json
from server.state import AppState, ServedModel
from server.streaming import Delta, Generation, Prompt, stream_events

logger = logging.getLogger(__name__)
router = APIRouter()
MAX_PROMPTS = 16
MAX_CHOICES = 64  # prompts x n: the fan-out of one request (RELIABILITY.md item 9)


@dataclass(frozen=True)
class TextPrompt:
    text: str  # what `echo` prepends: the prompt as sent, or its ids decoded
    ids: list[int]
    params: SamplingParams


def _prompt_items(raw: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a request: one text, one list of ids, or a list of either."""
    if isinstance(raw, str):
        return [raw]
    if raw and isinstance(raw[0], int):
        return [raw]  # one list of ids
    return list(cast(list[str | list[int]], raw))


def _encode(req: CompletionRequest, model: ServedModel) -> list[tuple[str, list[int]]]:
    items = _prompt_items(req.prompt)
    if not 0 < len(items) <= MAX_PROMPTS or [] in items:
        raise BadRequest(f"prompt: give 1 to {MAX_PROMPTS} prompts, none an empty id list", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, model.encoder.encode_text(item, bos=True)))
        else:
            model.check_token_ids(item, param="prompt")
            out.append((model.encoder.decode(list(item)), list(item)))
    return out


async def prompts_of(req: CompletionRequest, model: ServedModel) -> list[TextPrompt]:
    """Every prompt encoded and checked, before any model work."""
    prompts = []
    for text, ids in await asyncio.to_thread(_encode, req, model):
        params = completion_sampling_params(req, len(ids), model)
        if (total := len(ids) + params.max_tokens) > model.max_model_len:
            raise BadRequest(
                f"This model's maximum context length is {model.max_model_len} tokens. However, you "
                f"requested {total} tokens ({len(ids)} in the prompt, {params.max_tokens} to generate).",
                param="prompt",
                code="context_length_exceeded",
            )
        prompts.append(TextPrompt(text, ids, params))
    if len(prompts) * req.n > MAX_CHOICES:
        raise BadRequest(f"prompts x n: at most {MAX_CHOICES} choices per request", param="n")
    return prompts


class Tok(NamedTuple):
    token: str
    nbytes: int  # UTF-8 bytes it adds to the text
    logprob: float | None = None
    top: dict[str, float] | None = None


def tok(e: Logprob) -> Tok:
    return Tok(e.token, len(e.bytes), e.logprob, {t.token: t.logprob for t in e.top})


def null_tok(token_id: int, model: ServedModel) -> Tok:
    raw = model.encoder.token_bytes(token_id)
    return Tok(raw.decode("utf-8", "replace"), len(raw) if model.encoder.decode([token_id]) else 0)  # <s>: 0


def prompt_toks(p: TextPrompt, entries: Sequence[Logprob | None] | None, model: ServedModel) -> list[Tok]:
    """The prompt's tokens: the first (and any the engine left out) with a null logprob."""
    entries = list(entries or [None])
    if len(entries) < len(p.ids):  # prefix-cached tokens got no logprobs: keep the rest aligned
        entries = [None] * (len(p.ids) - len(entries) + 1) + entries[1:]
    return [tok(e) if e else null_tok(i, model) for i, e in zip(p.ids, entries, strict=False)]


def add_logprobs(block: CompletionLogprobs, tokens: list[Tok], text: str, base: int) -> None:
    """Append `tokens`, which spell `text`, found at character `base` of the choice's text.

    Offsets map the tokens' bytes onto `text`: a leading space the text lacks (SentencePiece's
    marker on its first word) is skipped; offsets past the end (EOS, a stop string) are clamped.
    """
    char_at = [i for i, ch in enumerate(text) for _ in ch.encode()] + [len(text)]
    lead = next((t for t in tokens if t.nbytes), None)
    pos = -1 if lead and lead.token.startswith(" ") and not text.startswith(" ") else 0
    for t in tokens:
        block.tokens.append(t.token)
        block.token_logprobs.append(t.logprob)
        block.top_logprobs.append(t.top)
        block.text_offset.append(base + char_at[min(max(pos, 0), len(char_at) - 1)])
        pos += t.nbytes


def choice_logprobs(
    req: CompletionRequest,
    p: TextPrompt,
    model: ServedModel,
    head: str,
    prompt_lps: Sequence[Logprob | None] | None,
    out_lps: Sequence[Logprob],
    text: str,
    base: int,
) -> CompletionLogprobs | None:
    """Logprobs of `head` (the echoed prompt, or "") then of the generated `text`, from character `base`."""
    if req.logprobs is None:
        return None
    block = CompletionLogprobs()
    if head:
        add_logprobs(block, prompt_toks(p, prompt_lps, model), head, base)
    add_logprobs(block, [tok(e) for e in out_lps], text, base + len(head))
    return block


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=streamed_or_json(
        "The completion; or, when `stream` is true, its chunks as server-sent events", CompletionResponse
    )
    | GENERATION_ERRORS,
)
async def completions(
    req: CompletionRequest, request: Request, state: Annotated[AppState, Depends(serving_state)]
) -> CompletionResponse | EventSourceResponse:
    if unknown := req.unknown_fields():
        logger.info("ignored unknown fields: %s", ", ".join(unknown[:20]))
    model = state.resolve(req.model)
    if (req.model_extra or {}).get("response_format") not in (None, {"type": "text"}):
        raise BadRequest(
            "response_format is supported on /v1/chat/completions only",
            param="response_format",
            code="unsupported_parameter",
        )
    prompts = await prompts_of(req, model)
    rid = f"cmpl-{uuid.uuid4().hex}"
    engine_ids = [f"{rid}-{k}" for k in range(len(prompts))]
    generation = Generation(
        state.engine, request, [Prompt(p.ids, p.params, p.ids) for p in prompts], engine_ids
    )
    if req.stream:
        await generation.start()  # errors before the first token are plain HTTP errors
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = CompletionChunks(req, model, rid, prompts)
        return event_stream(stream_events(generation, chunks, include_usage, rid), state.stall_timeout_s)
    choices = []
    for index, c in enumerate(await generation.collect()):
        p = prompts[index // req.n]
        head = p.text if req.echo else ""
        lp = choice_logprobs(req, p, model, head, c.prompt_logprobs, c.logprobs, c.text, 0)
        choices.append(
            CompletionChoice(index=index, text=head + c.text, finish_reason=c.finish_reason, logprobs=lp)
        )
    return CompletionResponse(
        id=rid, created=now(), model=req.model, choices=choices, usage=generation.usage()
    )


class CompletionChunks:
    """`text_completion` chunks, a `StreamFormat` of the streaming core: the echoed prompt rides
    on each choice's first chunk, and logprob offsets count the characters sent so far."""

    def __init__(
        self, req: CompletionRequest, model: ServedModel, rid: str, prompts: list[TextPrompt]
    ) -> None:
        self.req, self.model, self.rid, self.prompts = req, model, rid, prompts
        self.created = now()
        self.sent = [-1] * (len(prompts) * req.n)  # characters sent per choice; -1: nothing yet

    def _chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        chunk = CompletionResponse(
            id=self.rid, created=self.created, model=self.req.model, choices=choices, usage=usage
        )
        return sse_json(chunk)

    def opening(self) -> list[str]:
        return []

    def delta(self, delta: Delta, usage: UsageInfo | None) -> str | None:
        p, index = self.prompts[delta.prompt], delta.index
        head = p.text if self.req.echo and self.sent[index] < 0 else ""
        base = max(self.sent[index], 0)
        lps = delta.prompt_logprobs, list(delta.logprobs)
        lp = choice_logprobs(self.req, p, self.model, head, *lps, delta.text, base)
        self.sent[index] = base + len(head) + len(delta.text)
        if not (head or delta.text or delta.finish_reason or (lp and lp.tokens)):
            return None
        text = head + delta.text
        return self._chunk(
            [CompletionChoice(index=index, text=text, finish_reason=delta.finish_reason, logprobs=lp)], usage
        )

    def failed(self, index: int) -> str:
        return self._chunk([CompletionChoice(index=index, text="", finish_reason="error")])

    def usage_only(self, usage: UsageInfo) -> str:
        return self._chunk([], usage)
