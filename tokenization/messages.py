"""Typed chat messages parsed from API-shaped dicts, validated like mistral-common's serving mode.

Both prompt encoders (mistral-common and HF templates) take the same `ChatMessage` list, so a
conversation is accepted or refused the same way whichever tokenizer serves the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from tokenization.errors import InvalidConversationError, UnsupportedFeatureError
from tokenization.tool_calls import FUNCTION_NAME, ToolCall, ToolCallIdError, mistral_tool_call_id

Role = Literal["system", "user", "assistant", "tool"]

ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")
# OpenAI's `developer` role is a system prompt.
ROLE_ALIASES: dict[str, Role] = {"developer": "system"}

# mistral-common (tokenizers v1..v13) joins text chunks and consecutive same-role messages with a
# blank line and skips empty texts; we apply the same rule everywhere so both encoders agree.
MESSAGE_JOIN = "\n\n"

DEFAULT_MAX_MESSAGES = 4096
DEFAULT_MAX_CHUNKS = 16384
DEFAULT_MAX_TOTAL_CHARS = 1_000_000

# mistral-common's serving-mode rule for which role may follow which.
_ALLOWED_NEXT: dict[Role, frozenset[Role]] = {
    "system": frozenset({"user", "assistant", "system"}),
    "user": frozenset({"assistant", "system", "user"}),
    "assistant": frozenset({"assistant", "user", "tool"}),
    "tool": frozenset({"assistant", "tool", "user"}),
}
_MERGEABLE_ROLES: frozenset[Role] = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One validated chat message; `content` is plain text (text chunks already joined)."""

    role: Role
    content: str
    prefix: bool = False
    name: str | None = None
    tool_call_id: str | None = None  # a tool result's call, as a Mistral id (`tool_calls` module)
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's calls, with Mistral ids


@dataclass(slots=True)
class _Budget:
    """Fan-out protection: running totals of content chunks and characters."""

    max_chunks: int
    max_chars: int
    chunks: int = field(default=0)
    chars: int = field(default=0)

    def spend(self, chunks: int, chars: int, index: int) -> None:
        self.chunks += chunks
        self.chars += chars
        if self.chunks > self.max_chunks:
            raise InvalidConversationError(f"too many content chunks (more than {self.max_chunks})", index)
        if self.chars > self.max_chars:
            raise InvalidConversationError(
                f"conversation too long (more than {self.max_chars} characters)", index
            )


def join_texts(texts: list[str]) -> str:
    """Join texts with a blank line, skipping empty ones (mistral-common's aggregation rule)."""
    return MESSAGE_JOIN.join(text for text in texts if text)


def parse_messages(
    raw: list[dict[str, Any]],
    *,
    max_messages: int = DEFAULT_MAX_MESSAGES,
    max_chunks: int = DEFAULT_MAX_CHUNKS,
    max_total_chars: int = DEFAULT_MAX_TOTAL_CHARS,
) -> list[ChatMessage]:
    """Parse and validate API message dicts into `ChatMessage`s.

    Accepts `content` as a string or a list of `{"type": "text", "text": ...}` chunks, maps the
    `developer` role to `system`, ignores unknown keys, and enforces mistral-common's serving-mode
    structure (last message user/tool or a `prefix: true` assistant, allowed role order, ...).

    Raises:
        InvalidConversationError: with `index` set to the offending message where there is one.
    """
    if not isinstance(raw, list):
        raise InvalidConversationError("messages must be a list")
    if not raw:
        raise InvalidConversationError("conversation must have at least one message")
    if len(raw) > max_messages:
        raise InvalidConversationError(f"too many messages: {len(raw)} (at most {max_messages})")
    budget = _Budget(max_chunks=max_chunks, max_chars=max_total_chars)
    messages = [_parse_message(item, index, budget) for index, item in enumerate(raw)]
    _check_structure(messages)
    return messages


def tool_message_index(messages: list[ChatMessage]) -> int | None:
    """The first message that makes or answers a tool call, or None."""
    return next((i for i, m in enumerate(messages) if m.tool_calls or m.role == "tool"), None)


def merge_consecutive(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Merge runs of same-role system, user or assistant messages into one (tool messages stay apart).

    Contents are joined with `join_texts`; a merged assistant run keeps `prefix` if any member had it.
    """
    merged: list[ChatMessage] = []
    for message in messages:
        previous = merged[-1] if merged else None
        if previous is None or previous.role != message.role or message.role not in _MERGEABLE_ROLES:
            merged.append(message)
            continue
        merged[-1] = ChatMessage(
            role=previous.role,
            content=join_texts([previous.content, message.content]),
            prefix=previous.prefix or message.prefix,
            name=previous.name,
            tool_call_id=previous.tool_call_id,
            tool_calls=previous.tool_calls + message.tool_calls,
        )
    return merged


def _parse_message(item: object, index: int, budget: _Budget) -> ChatMessage:
    if not isinstance(item, dict):
        raise InvalidConversationError("each message must be an object", index)
    role = _parse_role(item.get("role"), index)
    calls = _parse_tool_calls(item.get("tool_calls"), index) if role == "assistant" else ()
    raw_content = item.get("content")
    content = "" if calls and raw_content is None else _parse_content(raw_content, index, budget)
    if role == "assistant" and not content and not calls:
        raise InvalidConversationError(
            "an assistant message must have non-empty content or tool calls", index
        )
    tool_call_id = _optional_str(item, "tool_call_id", index)
    if role == "tool":
        if tool_call_id is None:
            raise InvalidConversationError("a tool message needs the tool_call_id it answers", index)
        tool_call_id = _mistral_id(tool_call_id, index)
    return ChatMessage(
        role=role,
        content=content,
        prefix=_parse_prefix(item.get("prefix"), role, index),
        name=_optional_str(item, "name", index),
        tool_call_id=tool_call_id,
        tool_calls=calls,
    )


def _mistral_id(client_id: str, index: int) -> str:
    try:
        return mistral_tool_call_id(client_id)
    except ToolCallIdError as exc:
        raise InvalidConversationError(str(exc), index) from None


def _parse_tool_calls(value: object, index: int) -> tuple[ToolCall, ...]:
    """An assistant message's `tool_calls` (OpenAI's shape), ids mapped to Mistral's."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidConversationError("tool_calls must be a list", index)
    calls = []
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call.get("id"), str):
            raise InvalidConversationError("each tool call needs an id and a function", index)
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or FUNCTION_NAME.fullmatch(name) is None:
            raise InvalidConversationError(f"tool call function name {name!r} is not a valid name", index)
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False)
        if not isinstance(arguments, str):
            raise InvalidConversationError("tool call arguments must be a JSON string", index)
        calls.append(ToolCall(_mistral_id(call["id"], index), name, arguments))
    return tuple(calls)


def _parse_role(value: object, index: int) -> Role:
    if isinstance(value, str):
        if value in ROLE_ALIASES:
            return ROLE_ALIASES[value]
        if value in ROLES:
            return cast(Role, value)
    known = ", ".join([*ROLES, *ROLE_ALIASES])
    raise InvalidConversationError(f"unknown role {value!r}; expected one of {known}", index)


def _parse_content(value: object, index: int, budget: _Budget) -> str:
    if isinstance(value, str):
        budget.spend(1, len(value), index)
        return value
    if isinstance(value, list):
        texts = [_parse_chunk(chunk, index) for chunk in value]
        budget.spend(len(texts), sum(map(len, texts)), index)
        return join_texts(texts)
    kind = "null" if value is None else type(value).__name__
    raise InvalidConversationError(f"content must be a string or a list of text chunks, not {kind}", index)


def _parse_chunk(chunk: object, index: int) -> str:
    if not isinstance(chunk, dict):
        raise InvalidConversationError("each content chunk must be an object", index)
    kind = chunk.get("type")
    if kind != "text":
        raise UnsupportedFeatureError(f"content chunk type {kind!r} is not supported; only 'text' is", index)
    text = chunk.get("text")
    if not isinstance(text, str):
        raise InvalidConversationError("a text chunk must have a string 'text'", index)
    return text


def _parse_prefix(value: object, role: Role, index: int) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidConversationError("prefix must be a boolean", index)
    if value and role != "assistant":
        raise InvalidConversationError("prefix: true is only allowed on an assistant message", index)
    return value


def _optional_str(item: dict[str, Any], key: str, index: int) -> str | None:
    value = item.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidConversationError(f"{key} must be a string", index)
    return value


def _check_structure(messages: list[ChatMessage]) -> None:
    last = len(messages) - 1
    for index, message in enumerate(messages):
        if message.prefix and index != last:
            raise InvalidConversationError("prefix: true is only allowed on the last message", index)
    if last == 0 and messages[0].role not in ("user", "system"):
        raise InvalidConversationError("a conversation of one message must be a user or system message", 0)
    # mistral-common states "last role user or tool (or assistant with prefix)" but only enforces the
    # assistant part: a trailing system message is accepted (v1 moves it into the first user turn).
    final = messages[last]
    if last > 0 and final.role == "assistant" and not final.prefix:
        raise InvalidConversationError(
            "the last message must not be an assistant message unless it has prefix: true", last
        )
    for index in range(1, len(messages)):
        previous, current = messages[index - 1].role, messages[index].role
        if current not in _ALLOWED_NEXT[previous]:
            raise InvalidConversationError(f"role {current!r} cannot follow role {previous!r}", index)
    called: set[str] = set()
    for index, message in enumerate(messages):
        for call in message.tool_calls:
            if call.id in called:
                raise InvalidConversationError(
                    f"two tool calls have the Mistral id {call.id!r} (a client's id stands for its "
                    "last 9 characters)",
                    index,
                )
            called.add(call.id)
        if message.role == "tool" and message.tool_call_id not in called:
            raise InvalidConversationError(
                f"tool message answers tool call {message.tool_call_id!r}, which no earlier assistant "
                "message made",
                index,
            )
