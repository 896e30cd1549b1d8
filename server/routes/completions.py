"""POST /v1/completions: OpenAI's legacy text completion (prompt as text or token ids, echo, logprobs)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse

from engine.outputs import Logprob
from engine.sampling_params import SamplingParams
from server.deps import serving_state
from server.errors import BadRequest
from server.generation import ChoiceResult, collect, finish_reason
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    now,
)
from server.routes.chat import SSE_HEADERS
from server.routes.tokenize import check_token_ids
from server.sampling import completion_sampling_params
from server.state import AppState, ServedModel

router = APIRouter()
MAX_PROMPTS = 16


def prompt_list(req: CompletionRequest, model: ServedModel) -> list[tuple[str, list[int]]]:
    """(text, ids) of each prompt: a string, strings, token ids, or lists of token ids."""
    raw = req.prompt
    items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    if not items or len(items) > MAX_PROMPTS:
        raise BadRequest(f"prompt: give 1 to {MAX_PROMPTS} prompts", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, model.encoder.encode_text(item, bos=True)))
        else:
            check_token_ids(list(item), model)
            out.append((model.encoder.decode(list(item)), list(item)))
    return out


def logprobs_block(entries: list[Logprob | None], offset: int) -> CompletionLogprobs:
    block = CompletionLogprobs()
    for entry in entries:
        token = entry.token if entry else ""
        block.tokens.append(token)
        block.token_logprobs.append(entry.logprob if entry else None)
        block.top_logprobs.append({t.token: t.logprob for t in entry.top} if entry else None)
        block.text_offset.append(offset)
        offset += len(token)
    return block


def choice_out(index: int, prompt_text: str, c: ChoiceResult, req: CompletionRequest) -> CompletionChoice:
    text = (prompt_text if req.echo else "") + c.text
    lp = None
    if req.logprobs is not None:
        entries: list[Logprob | None] = list(c.logprobs)
        if req.echo:
            entries = list(c.prompt_logprobs or ()) + entries
        lp = logprobs_block(entries, 0)
    return CompletionChoice(index=index, text=text, finish_reason=c.finish_reason, logprobs=lp)


@router.post("/v1/completions", response_model=None)
async def completions(
    req: CompletionRequest, request: Request, state: Annotated[AppState, Depends(serving_state)]
):
    model = state.resolve(req.model)
    prompts = prompt_list(req, model)
    base_id = f"cmpl-{uuid.uuid4().hex}"
    if req.stream:
        if len(prompts) > 1:
            raise BadRequest("streaming supports a single prompt", param="prompt")
        text, ids = prompts[0]
        params = completion_sampling_params(req, len(ids), model)
        stream = CompletionStream(state, req, base_id, ids, params)
        await stream.start()
        return EventSourceResponse(stream.events(), sep="\n", headers=SSE_HEADERS, ping=15)
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for p, (text, ids) in enumerate(prompts):
        params = completion_sampling_params(req, len(ids), model)
        result = await collect(request, state.engine, ids, params, f"{base_id}-{p}", [])
        prompt_tokens += result.prompt_tokens
        completion_tokens += result.completion_tokens
        choices += [choice_out(p * req.n + i, text, c, req) for i, c in enumerate(result.choices)]
    usage = UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
    return CompletionResponse(id=base_id, created=now(), model=req.model, choices=choices, usage=usage)


class CompletionStream:
    """SSE `text_completion` chunks of one prompt's choices, then `[DONE]`."""

    def __init__(
        self, state: AppState, req: CompletionRequest, rid: str, ids: list[int], params: SamplingParams
    ):
        self.req, self.rid, self.params = req, rid, params
        self.prompt_tokens = len(ids)
        self.created = now()
        self._outputs = state.engine.generate(ids, params, rid, [])
        self._first = None

    async def start(self) -> None:
        self._first = await anext(self._outputs)

    def _chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        body = CompletionResponse(
            id=self.rid, created=self.created, model=self.req.model, choices=choices, usage=usage
        )
        return body.model_dump_json()

    async def events(self) -> AsyncIterator[str]:
        completion_tokens = 0
        try:
            pending, self._first = [self._first], None
            while pending:
                out = pending.pop()
                completion_tokens += len(out.new_token_ids)
                reason = (
                    ("error" if out.error else finish_reason(out.finish_reason)) if out.finished else None
                )
                lp = logprobs_block(list(out.logprobs), 0) if self.params.logprobs is not None else None
                if out.new_text or reason is not None:
                    yield self._chunk(
                        [
                            CompletionChoice(
                                index=out.index, text=out.new_text, finish_reason=reason, logprobs=lp
                            )
                        ]
                    )
                nxt = await anext(self._outputs, None)
                if nxt is not None:
                    pending.append(nxt)
        except Exception:
            yield self._chunk([CompletionChoice(index=0, text="", finish_reason="error")])
        finally:
            await self._outputs.aclose()
        if self.req.stream_options and self.req.stream_options.include_usage:
            total = self.prompt_tokens + completion_tokens
            usage = UsageInfo(
                prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens, total_tokens=total
            )
            yield self._chunk([], usage)
        yield "[DONE]"
