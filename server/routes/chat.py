"""POST /v1/chat/completions: Mistral's chat API, which OpenAI clients speak too."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse

from engine.outputs import Logprob
from server.deps import serving_state
from server.errors import BadRequest
from server.openapi import GENERATION_ERRORS, streamed_or_json
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
from server.response_format import ResponseFormat, parse_response_format
from server.sampling import chat_sampling_params
from server.sse import event_stream, sse_json
from server.state import AppState, ServedModel
from server.streaming import Delta, Generation, Prompt, stream_events
from server.tool_output import ToolCallChunks, collected_reply
from server.tools import ToolRequest, parse_tools
from tokenization import ChatMessage, parse_messages, with_safe_prompt
from tokenization.schema_prompt import with_schema_instruction

logger = logging.getLogger(__name__)
router = APIRouter()


def check_unsupported(tools: ToolRequest | None, response_format: ResponseFormat, model: ServedModel) -> None:
    if tools is None or not tools.offered:
        return
    if model.encoder.tool_calls_id is None:
        raise BadRequest(
            f"{model.name} does not support tools (its tokenizer has no tool tokens)",
            param="tools",
            code="unsupported_parameter",
        )
    if response_format.structured is not None:
        raise BadRequest(
            "response_format and tools cannot both shape one reply; send tool_choice 'none' or no "
            "response_format",
            param="response_format",
            code="unsupported_parameter",
        )


async def encode(
    req: ChatCompletionRequest,
    model: ServedModel,
    response_format: ResponseFormat,
    tools: ToolRequest | None = None,
) -> tuple[list[ChatMessage], list[int]]:
    """The conversation as the model sees it (with the tools it offers): the schema's
    instruction, then the guardrail, go before it (`tokenization.schema_prompt`)."""
    messages = parse_messages(req.messages)
    if response_format.schema is not None:
        messages = with_schema_instruction(messages, response_format.schema)
    if req.safe_prompt:
        messages = with_safe_prompt(messages)
    offered = tools.offered if tools is not None else ()
    prompt_ids = await asyncio.to_thread(model.encoder.encode_chat, messages, offered)
    return messages, prompt_ids


def prefix_of(messages: list[ChatMessage]) -> str:
    last = messages[-1]
    return last.content if last.role == "assistant" and last.prefix else ""


def context_ids(model: ServedModel, prompt_ids: list[int], prefix: str) -> list[int]:
    """The prompt's tail that spells the prefix, so the reply continues its text exactly."""
    if not prefix:
        return []
    return prompt_ids[-len(model.encoder.encode_text(prefix, bos=False)) :]


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=streamed_or_json(
        "The completion; or, when `stream` is true, its chunks as server-sent events", ChatCompletionChunk
    )
    | GENERATION_ERRORS,
)
async def chat_completions(
    req: ChatCompletionRequest, request: Request, state: Annotated[AppState, Depends(serving_state)]
) -> ChatCompletionResponse | EventSourceResponse:
    if unknown := req.unknown_fields():
        logger.info("ignored unknown fields: %s", ", ".join(unknown[:20]))
    model = state.resolve(req.model)
    tools = parse_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
    response_format = parse_response_format(req.response_format)
    check_unsupported(tools, response_format, model)
    messages, prompt_ids = await encode(req, model, response_format, tools)
    structured, tool_calls_id = response_format.structured, None  # tool_calls_id: calls may be written
    banned: tuple[int, ...] = ()
    if tools is not None and tools.offered and model.encoder.tool_calls_id is not None:
        tool_calls_id = model.encoder.tool_calls_id
        structured = tools.grammar(tool_calls_id)
    elif model.encoder.tool_calls_id is not None:  # no tools offered: the model cannot call one
        banned = (model.encoder.tool_calls_id,)
    params = chat_sampling_params(req, len(prompt_ids), model, structured, banned)
    prefix = prefix_of(messages)
    context = context_ids(model, prompt_ids, prefix)
    if params.structured is not None and prefix and model.encoder.decode(context) != prefix:
        # The grammar continues the text the prompt's tail decodes to; the reply is prefix + text.
        raise BadRequest(
            "the assistant prefix does not decode back to itself after tokenization, so a "
            "structured reply cannot continue it exactly",
            param="messages",
            code="invalid_response_format",
        )
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    prompt = Prompt(prompt_ids, params, context)
    generation = Generation(state.engine, request, [prompt], [request_id])
    if req.stream:
        await generation.start()  # errors before the first token are plain HTTP errors
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = ChatChunks(req.model, request_id, params.n, params.logprobs is not None, tool_calls_id)
        return event_stream(
            stream_events(generation, chunks, include_usage, request_id), state.stall_timeout_s
        )
    choices = await generation.collect()
    replies = [collected_reply(c, tool_calls_id) for c in choices]
    return ChatCompletionResponse(
        id=request_id,
        created=now(),
        model=req.model,
        choices=[
            ChatChoice(
                index=i,
                message=AssistantMessageOut(content=prefix + content, tool_calls=calls, prefix=bool(prefix)),
                finish_reason=finish,
                logprobs=logprobs_out(c.logprobs) if params.logprobs is not None else None,
            )
            for i, (c, (content, calls, finish)) in enumerate(zip(choices, replies, strict=True))
        ],
        usage=generation.usage(),
    )


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


class ChatChunks:
    """`chat.completion.chunk`s (API.md, "Streaming"): a `StreamFormat` of the streaming core."""

    def __init__(
        self, model_name: str, request_id: str, n: int, logprobs: bool, tool_calls_id: int | None = None
    ) -> None:
        self.model_name = model_name
        self.request_id = request_id
        self.n = n
        self.logprobs = logprobs
        self.created = now()
        self.tool_calls = ToolCallChunks(tool_calls_id)

    def _chunk(self, choices: list[ChatChunkChoice], usage_info: UsageInfo | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model_name, choices=choices, usage=usage_info
        )
        return sse_json(chunk)

    def opening(self) -> list[str]:
        role = DeltaMessage(role="assistant", content="")
        return [self._chunk([ChatChunkChoice(index=i, delta=role)]) for i in range(self.n)]

    def delta(self, delta: Delta, usage: UsageInfo | None) -> str | None:
        lp = logprobs_out(list(delta.logprobs)) if self.logprobs and delta.logprobs else None
        calls = self.tool_calls.take(delta)
        if calls is not None:  # a reply of tool calls: their deltas instead of its text
            tool_deltas, finish = calls
            if tool_deltas is None and finish is None and lp is None:
                return None
            message = DeltaMessage(tool_calls=tool_deltas)
        else:
            if not delta.text and delta.finish_reason is None and lp is None:
                return None
            message, finish = DeltaMessage(content=delta.text), delta.finish_reason
        choice = ChatChunkChoice(index=delta.index, delta=message, finish_reason=finish, logprobs=lp)
        return self._chunk([choice], usage)

    def failed(self, index: int) -> str:
        return self._chunk(
            [ChatChunkChoice(index=index, delta=DeltaMessage(content=""), finish_reason="error")]
        )

    def usage_only(self, usage: UsageInfo) -> str:
        return self._chunk([], usage)
