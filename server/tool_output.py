"""A reply's tool calls, collected or streamed, in the OpenAI/Mistral response shapes.

A reply holds calls when its first token is `[TOOL_CALLS]` (the grammar of `server.tools` makes
a reply either free text or `[TOOL_CALLS]` and the calls, never both). Its text after that
token, which decoding never shows, is the JSON list of calls (`tokenization.tool_calls`).
- Collected: `message.tool_calls` with fresh 9-character ids, `content` "", and
  `finish_reason: "tool_calls"`. A reply cut by `max_tokens` keeps `length` and its raw text.
- Streamed: each call's id, type and name in one delta (arguments ""), then its arguments in
  fragments as they come; the last chunk says `tool_calls`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from server.protocol import FunctionCallOut, ToolCallDeltaOut, ToolCallOut
from server.streaming import Choice, Delta
from tokenization.tool_calls import ToolCallStream, parse_tool_calls

logger = logging.getLogger(__name__)


def opens_tool_calls(token_ids: list[int] | tuple[int, ...], tool_calls_id: int | None) -> bool:
    return tool_calls_id is not None and bool(token_ids) and token_ids[0] == tool_calls_id


Reply = tuple[str, list[ToolCallOut] | None, str | None]  # content, tool calls, finish reason


def collected_reply(choice: Choice, tool_calls_id: int | None) -> Reply:
    """(content, tool calls, finish reason) of a collected choice."""
    if not opens_tool_calls(choice.token_ids, tool_calls_id) or choice.finish_reason != "stop":
        return choice.text, None, choice.finish_reason
    try:
        calls = parse_tool_calls(choice.text)
    except ValueError:  # the grammar forbids this; a reply without one (auto, free) never gets here
        logger.exception("a reply that opened tool calls does not parse: %r", choice.text[:200])
        return choice.text, None, choice.finish_reason
    out = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls]
    return "", out, "tool_calls"


@dataclass
class ToolCallChunks:
    """The streamed tool calls of each choice of one request."""

    tool_calls_id: int | None
    _streams: dict[int, ToolCallStream] = field(default_factory=dict)  # choices that opened calls

    def take(self, delta: Delta) -> tuple[list[ToolCallDeltaOut] | None, str | None] | None:
        """For a choice in tool-call mode: its call deltas and finish reason; None for free text."""
        stream = self._streams.get(delta.index)
        if stream is None:
            if not opens_tool_calls(delta.token_ids, self.tool_calls_id):
                return None
            stream = self._streams[delta.index] = ToolCallStream()
        out = [
            ToolCallDeltaOut(
                index=d.index,
                id=d.id,
                type="function" if d.id is not None else None,
                function=FunctionCallOut(name=d.name or "", arguments=d.arguments),
            )
            for d in stream.feed(delta.text)
        ]
        finish = "tool_calls" if delta.finish_reason == "stop" else delta.finish_reason
        return out or None, finish
