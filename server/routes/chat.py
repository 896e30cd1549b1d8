"""POST /v1/chat/completions: Mistral's chat API, which OpenAI clients speak too."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from engine.outputs import Logprob
from engine.sampling_params import SamplingParams
from server.deps import serving_state
from server.errors import BadRequest
from server.generation import collect, finish_reason, first_output
from server.protocol import (
    AssistantMessageOut,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    DeltaMessage,
    LogprobOut,
    TopLogprobOut,
    UsageInfo,
    now,
)
from server.sampling import chat_sampling_params
from server.sse import event_stream, sse_json
from server.state import AppState, ServedModel
from tokenization import ChatMessage, parse_messages, with_safe_prompt

logger = logging.getLogger(__name__)
router = APIRouter()


def check_unsupported(req: ChatCompletionRequest, model: ServedModel) -> None:
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise BadRequest(
            f"response_format {fmt!r} is not supported yet (no constrained decoding)",
            param="response_format",
            code="unsupported_parameter",
        )
    if req.tools and req.tool_choice != "none" and not model.encoder.supports_tools:
        raise BadRequest(
            f"{model.name} does not support tools (its tokenizer has no tool tokens)",
            param="tools",
            code="unsupported_parameter",
        )


async def encode(req: ChatCompletionRequest, model: ServedModel) -> tuple[list[ChatMessage], list[int]]:
    messages = parse_messages(req.messages)
    if req.safe_prompt:
        messages = with_safe_prompt(messages)
    prompt_ids = await asyncio.to_thread(model.encoder.encode_chat, messages)
    return messages, prompt_ids


def prefix_of(messages: list[ChatMessage]) -> str:
    last = messages[-1]
    return last.content if last.role == "assistant" and last.prefix else ""


def context_ids(model: ServedModel, prompt_ids: list[int], prefix: str) -> list[int]:
    """The prompt's tail that spells the prefix, so the reply continues its text exactly."""
    if not prefix:
        return []
    return prompt_ids[-len(model.encoder.encode_text(prefix, bos=False)) :]


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    req: ChatCompletionRequest, request: Request, state: Annotated[AppState, Depends(serving_state)]
):
    if unknown := req.unknown_fields():
        logger.info("ignored unknown fields: %s", ", ".join(unknown[:20]))
    model = state.resolve(req.model)
    check_unsupported(req, model)
    messages, prompt_ids = await encode(req, model)
    params = chat_sampling_params(req, len(prompt_ids), model)
    prefix = prefix_of(messages)
    ctx = context_ids(model, prompt_ids, prefix)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        stream = ChatStream(state, req.model, request_id, prompt_ids, params, ctx, include_usage)
        await stream.start(request)  # errors before the first token are plain HTTP errors
        return event_stream(stream.events())
    result = await collect(request, state.engine, prompt_ids, params, request_id, ctx)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessageOut(content=prefix + c.text, prefix=bool(prefix)),
            finish_reason=c.finish_reason,
            logprobs=logprobs_out(c.logprobs) if params.logprobs is not None else None,
        )
        for i, c in enumerate(result.choices)
    ]
    return ChatCompletionResponse(
        id=request_id,
        created=now(),
        model=req.model,
        choices=choices,
        usage=usage(result.prompt_tokens, result.completion_tokens),
    )


def usage(prompt: int, completion: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def logprobs_out(entries: list[Logprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            LogprobOut(
                token=e.token,
                logprob=e.logprob,
                bytes=list(e.bytes),
                top_logprobs=[
                    TopLogprobOut(token=t.token, logprob=t.logprob, bytes=list(t.bytes)) for t in e.top
                ],
            )
            for e in entries
        ]
    )


class ChatStream:
    """SSE chunks of one chat completion (API.md, "Streaming")."""

    def __init__(
        self,
        state: AppState,
        model_name: str,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        ctx: list[int],
        include_usage: bool,
    ) -> None:
        self.state = state
        self.model_name = model_name
        self.request_id = request_id
        self.params = params
        self.prompt_tokens = len(prompt_ids)
        self.include_usage = include_usage
        self.created = now()
        self._outputs = state.engine.generate(prompt_ids, params, request_id, ctx)
        self._first = None

    async def start(self, request: Request) -> None:
        """Wait for the first output, so a request the engine refuses gets a proper status code
        (and one whose client leaves meanwhile is aborted)."""
        self._first = await first_output(request, self._outputs)

    def _chunk(self, choices: list[ChatChunkChoice], usage_info: UsageInfo | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model_name, choices=choices, usage=usage_info
        )
        return sse_json(chunk)

    async def events(self) -> AsyncIterator[str]:
        completion_tokens = 0
        remaining = self.params.n
        for i in range(self.params.n):
            yield self._chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        try:
            first, self._first = self._first, None
            pending = [first] if first is not None else []
            async for out in _chain(pending, self._outputs):
                completion_tokens += len(out.new_token_ids)
                remaining -= out.finished
                reason = "error" if out.error else finish_reason(out.finish_reason) if out.finished else None
                last = remaining == 0
                usage_info = (
                    usage(self.prompt_tokens, completion_tokens) if last and not self.include_usage else None
                )
                lp = (
                    logprobs_out(list(out.logprobs))
                    if self.params.logprobs is not None and out.logprobs
                    else None
                )
                if out.new_text or reason is not None or lp is not None:
                    choice = ChatChunkChoice(
                        index=out.index,
                        delta=DeltaMessage(content=out.new_text),
                        finish_reason=reason,
                        logprobs=lp,
                    )
                    yield self._chunk([choice], usage_info)
        except Exception as exc:  # after the first byte: report in-band, the stream stays parseable
            logger.warning("stream %s failed: %s", self.request_id, type(exc).__name__)
            for i in range(self.params.n):
                yield self._chunk(
                    [ChatChunkChoice(index=i, delta=DeltaMessage(content=""), finish_reason="error")]
                )
        finally:
            await self._outputs.aclose()  # a cancelled stream (client gone) aborts the request here
        if self.include_usage:
            yield self._chunk([], usage(self.prompt_tokens, completion_tokens))
        yield "[DONE]"


async def _chain(first, rest):
    for item in first:
        yield item
    async for item in rest:
        yield item
