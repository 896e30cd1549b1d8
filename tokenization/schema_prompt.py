"""Mistral's prompt rule for `json_schema` output: the schema is stated in the system prompt.

Mistral's documentation (capabilities, structured output, custom) says that in this mode the API
always prepends to the system prompt:
`Your output should be an instance of a JSON object following this schema: {{ json_schema }}`.
We do the same, with these rules fixed (and tested):
- the schema is serialized by `json.dumps(schema, ensure_ascii=False)`: the keys in the order the
  client sent them, Python's default separators (`", "` and `": "`), non-ASCII text as is;
- the text is a system message of its own placed before the conversation's messages, so the
  encoders join it to an existing system prompt with a blank line ("\\n\\n"), as mistral-common
  joins system messages;
- `safe_prompt`'s guardrail is applied after it, so the guardrail comes first, then this text,
  then the client's own system prompt.
`json_object` adds nothing: the client asks for JSON in its own words, as with Mistral's API.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tokenization.messages import ChatMessage

SCHEMA_INSTRUCTION = "Your output should be an instance of a JSON object following this schema: {json_schema}"


def schema_instruction(schema: Mapping[str, Any]) -> str:
    """The system text for `schema`, serialized as the module docstring states."""
    return SCHEMA_INSTRUCTION.format(json_schema=json.dumps(schema, ensure_ascii=False))


def with_schema_instruction(messages: list[ChatMessage], schema: Mapping[str, Any]) -> list[ChatMessage]:
    """`messages` with the schema's system message before them."""
    return [ChatMessage(role="system", content=schema_instruction(schema)), *messages]
