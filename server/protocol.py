"""Request and response bodies of the HTTP API (API.md), as pydantic models, in the order of the docs.

Requests accept both Mistral and OpenAI field names and ignore unknown fields (old `mistralai`
always sends `safe_prompt`; OpenAI clients send `store`, `user`, ...). Numbers are strict about
their type (a string is not a number) but range checks happen when the request becomes engine
`SamplingParams`, so an out-of-range value is a 400 naming its field.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

Number = Annotated[float, Strict()]  # int or float, never a string or bool
Integer = Annotated[int, Strict()]
INVALID_UNICODE = "invalid_unicode"  # the validation error type of a lone surrogate


def lone_surrogate_at(body: Any) -> str | None:
    """Where `body` (parsed JSON) holds a string that is not valid Unicode, as `messages[0].content`.

    JSON can spell a lone UTF-16 surrogate (`"\\ud800"`) that no UTF-8 text can hold; Python's
    parser lets it through, and the tokenizers then fail on it deep inside.
    """
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and not _encodes(value):
                return path or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if not _encodes(str(key)):
                    return path or "body"
                stack.append((where, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class APIRequest(BaseModel):
    """Base of every request: unknown fields are accepted and ignored (their names are logged)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if (where := lone_surrogate_at(data)) is not None:
            raise PydanticCustomError(
                INVALID_UNICODE, "{param}: text is not valid Unicode (a lone surrogate)", {"param": where}
            )
        return data

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(APIRequest):
    model: str
    messages: list[dict[str, Any]]
    temperature: Number | None = None  # None: the served model's default
    top_p: Number = 1.0
    max_tokens: Integer | None = None
    max_completion_tokens: Integer | None = None  # OpenAI's name; wins over max_tokens
    min_tokens: Integer | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    random_seed: Integer | None = None
    seed: Integer | None = None  # OpenAI's name for random_seed
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    n: Integer = 1
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    safe_prompt: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: Integer | None = None
    logit_bias: dict[str, Number] | None = None
    user: str | None = None
    # Extras of the peer servers.
    top_k: Integer | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    ignore_eos: bool = False


class CompletionRequest(APIRequest):
    model: str
    prompt: str | list[str] | list[Integer] | list[list[Integer]]
    suffix: str | None = None
    max_tokens: Integer | None = 16
    temperature: Number | None = None
    top_p: Number = 1.0
    n: Integer = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Integer | None = None
    echo: bool = False
    stop: str | list[str] | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    best_of: Integer | None = None
    logit_bias: dict[str, Number] | None = None
    seed: Integer | None = None
    random_seed: Integer | None = None
    user: str | None = None
    top_k: Integer | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: Integer | None = None
    ignore_eos: bool = False


class TokenizeRequest(APIRequest):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    safe_prompt: bool = False
    add_special_tokens: bool = True


class DetokenizeRequest(APIRequest):
    model: str | None = None
    tokens: list[Integer]


# ---- responses -------------------------------------------------------------------------------


def now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class LogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(BaseModel):
    content: list[LogprobOut]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ToolCallDeltaOut(BaseModel):
    """A piece of a streamed call: its id, type and name first (arguments ""), then its arguments
    in fragments, without id and type. A fragment's `name` is "": the `mistralai` SDK requires
    the key, and `openai`'s stream helper concatenates it to nothing."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallOut

    @model_serializer(mode="wrap")
    def _omit_absent_id_and_type(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A fragment leaves `id` and `type` out: `openai`'s stream helper overwrites them with
        what a delta says, and a null `type` fails its check."""
        data: dict[str, Any] = handler(self)
        for key in ("id", "type"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class AssistantMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str  # never null: mistralai 0.4.2 requires a string
    tool_calls: list[ToolCallOut] | None = None
    prefix: bool = False


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessageOut
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_tool_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None  # the key is always present (mistralai requires it)
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCapabilities(BaseModel):
    completion_chat: bool = True
    completion_fim: bool = False
    function_calling: bool = False
    fine_tuning: bool = False
    vision: bool = False
    classification: bool = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mixtral-server"
    type: Literal["base"] = "base"
    capabilities: ModelCapabilities = Field(default_factory=ModelCapabilities)
    name: str
    description: str
    max_context_length: int
    aliases: list[str] = Field(default_factory=list)
    deprecation: str | None = None
    default_model_temperature: float


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthStatus(BaseModel):
    status: Literal["ok", "dead"]
    error: str | None = None  # why the engine died


class ReadyStatus(BaseModel):
    status: Literal["ready", "loading", "shutting_down"]
    model: str | None = None


# ---- errors ----------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ValidationDetail(BaseModel):
    type: str | None
    loc: list[str | int]
    msg: str


class ErrorResponse(BaseModel):
    """Every error body: `error` (what `openai` reads); validation errors add FastAPI's `detail`."""

    error: ErrorInfo
    detail: list[ValidationDetail] | None = None
