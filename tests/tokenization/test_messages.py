"""parse_messages: typed messages from API dicts, refused the way mistral-common's serving mode refuses."""

from __future__ import annotations

from typing import Any

import pytest
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from tests.tokenization.conftest import V1_MODEL
from tokenization import ChatMessage, InvalidConversationError, UnsupportedFeatureError, parse_messages
from tokenization.messages import DEFAULT_MAX_MESSAGES, merge_consecutive

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
S = {"role": "system", "content": "sys"}
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
TOOL_CALL = {"id": "abc123xyz", "type": "function", "function": {"name": "f", "arguments": "{}"}}

INVALID: list[tuple[str, Any, int | None]] = [
    ("empty", [], None),
    ("not_a_list", {"role": "user", "content": "hi"}, None),
    ("message_not_object", [U, "hello"], 1),
    ("unknown_role", [U, A, {"role": "bot", "content": "x"}], 2),
    ("missing_role", [{"content": "x"}], 0),
    ("prefix_not_last", [U, {**A, "prefix": True}, U], 1),
    ("prefix_on_user", [{**U, "prefix": True}], 0),
    ("prefix_not_bool", [U, {**A, "prefix": "yes"}], 1),
    ("last_assistant", [S, U, A], 2),
    ("only_assistant_prefix", [{**A, "prefix": True}], 0),
    ("null_content", [S, {"role": "user", "content": None}], 1),
    ("missing_content", [{"role": "user"}], 0),
    ("null_system_content", [{"role": "system", "content": None}, U], 0),
    ("int_content", [{"role": "user", "content": 3}], 0),
    ("empty_assistant", [U, {"role": "assistant", "content": ""}, U], 1),
    ("empty_assistant_chunks", [U, {"role": "assistant", "content": [{"type": "text", "text": ""}]}, U], 1),
    ("chunk_not_object", [{"role": "user", "content": ["hi"]}], 0),
    ("chunk_without_text", [{"role": "user", "content": [{"type": "text"}]}], 0),
    ("system_after_assistant", [U, A, S, U], 2),
    ("tool_after_user", [U, {"role": "tool", "content": "r", "tool_call_id": "abc123xyz"}], 1),
    ("tool_without_call", [U, A, {"role": "tool", "content": "r", "tool_call_id": "abc123xyz"}], 2),
    ("name_not_string", [{**U, "name": 5}], 0),
]

UNSUPPORTED: list[tuple[str, Any, int]] = [
    ("image_chunk", [U, A, {"role": "user", "content": [{"type": "text", "text": "see"}, IMAGE]}], 2),
    ("audio_chunk", [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], 0),
]


def test_an_assistant_tool_call_with_null_content_parses_with_its_id() -> None:
    messages = parse_messages([U, {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}, U])
    (call,) = messages[1].tool_calls
    assert messages[1].content == "" and call.id == TOOL_CALL["id"][-9:]
    assert call.name == TOOL_CALL["function"]["name"]


@pytest.mark.parametrize(("raw", "index"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_conversations(raw: Any, index: int | None) -> None:
    with pytest.raises(InvalidConversationError) as caught:
        parse_messages(raw)
    assert caught.value.index == index
    prefix = f"messages[{index}]: " if index is not None else "messages: "
    assert str(caught.value) == prefix + caught.value.message


@pytest.mark.parametrize(
    ("raw", "index"), [case[1:] for case in UNSUPPORTED], ids=[case[0] for case in UNSUPPORTED]
)
def test_unsupported_features(raw: Any, index: int) -> None:
    with pytest.raises(UnsupportedFeatureError) as caught:
        parse_messages(raw)
    assert caught.value.index == index


def test_error_is_a_value_error_with_location() -> None:
    with pytest.raises(ValueError, match=r"^messages\[3\]: the last message must not be an assistant"):
        parse_messages([S, U, A, A])


SERVING_REFUSES = [
    ("empty", []),
    ("last_assistant", [UserMessage(content="hi"), AssistantMessage(content="hello")]),
    (
        "prefix_not_last",
        [UserMessage(content="q"), AssistantMessage(content="a", prefix=True), UserMessage(content="u")],
    ),
    ("only_assistant_prefix", [AssistantMessage(content="a", prefix=True)]),
    ("empty_assistant", [UserMessage(content="q"), AssistantMessage(content=""), UserMessage(content="u")]),
    (
        "system_after_assistant",
        [UserMessage(content="q"), AssistantMessage(content="a"), SystemMessage(content="s")],
    ),
    ("tool_after_user", [UserMessage(content="q"), ToolMessage(content="r", tool_call_id="abc123xyz")]),
]


@pytest.mark.parametrize(
    "messages", [case[1] for case in SERVING_REFUSES], ids=[case[0] for case in SERVING_REFUSES]
)
def test_mistral_common_serving_mode_agrees(messages: list[Any]) -> None:
    tokenizer = MistralTokenizer.from_file(V1_MODEL, mode=ValidationMode.serving)
    with pytest.raises(MistralCommonException):
        tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages, model="m"))


def test_too_many_messages() -> None:
    with pytest.raises(InvalidConversationError, match="too many messages") as caught:
        parse_messages([U] * (DEFAULT_MAX_MESSAGES + 1))
    assert caught.value.index is None
    with pytest.raises(InvalidConversationError):
        parse_messages([U] * 4, max_messages=3)
    assert len(parse_messages([U] * 3, max_messages=3)) == 3


def test_too_many_characters_and_chunks() -> None:
    with pytest.raises(InvalidConversationError, match="too long") as caught:
        parse_messages([U, A, {"role": "user", "content": "x" * 20}], max_total_chars=20)
    assert caught.value.index == 2
    chunks = [{"type": "text", "text": "x"}] * 5
    with pytest.raises(InvalidConversationError, match="chunks"):
        parse_messages([{"role": "user", "content": chunks}], max_chunks=4)


def test_parses_roles_chunks_and_fields() -> None:
    raw = [
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "q", "name": "alice", "unknown_field": 1},
        {"role": "assistant", "content": "Sure", "prefix": True, "tool_calls": None},
    ]
    assert parse_messages(raw) == [
        ChatMessage("system", "a\n\nb"),
        ChatMessage("user", "q", name="alice"),
        ChatMessage("assistant", "Sure", prefix=True),
    ]


def test_single_system_message_is_allowed_like_mistral_common() -> None:
    assert parse_messages([S]) == [ChatMessage("system", "sys")]


def test_chat_message_is_frozen() -> None:
    message = ChatMessage("user", "x")
    with pytest.raises(AttributeError):
        message.content = "y"  # type: ignore[misc]


def test_merge_consecutive() -> None:
    messages = [
        ChatMessage("system", "A"),
        ChatMessage("system", ""),
        ChatMessage("system", "B"),
        ChatMessage("user", "u1"),
        ChatMessage("user", "u2"),
        ChatMessage("assistant", "x"),
        ChatMessage("assistant", "y", prefix=True),
    ]
    assert merge_consecutive(messages) == [
        ChatMessage("system", "A\n\nB"),
        ChatMessage("user", "u1\n\nu2"),
        ChatMessage("assistant", "x\n\ny", prefix=True),
    ]
    tools = [ChatMessage("tool", "r1"), ChatMessage("tool", "r2")]
    assert merge_consecutive(tools) == tools
