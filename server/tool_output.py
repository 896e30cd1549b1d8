"""A reply's tool calls, collected or streamed, in the OpenAI/Mistral response shapes.

A reply holds calls when its first token is `[TOOL_CALLS]` (the grammar of `server.tools` makes
a reply either free text or `[TOOL_CALLS]` and the calls, never both). Its text after that
token, which decoding never shows, is the JSON list of calls (`tokenization.tool_calls`).
- Streamed: each call's id, type and name in one delta (arguments ""), then its arguments in
  fragments as they come; the last chunk says `tool_calls` once the list has ended.
- Collected: the same calls, `content` "" and the same finish reason: `tool_calls`, or for a
  reply cut short (`max_tokens`, a stop string) its own reason and the calls as far as they got.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.protocol import FunctionCallOut, ToolCallDeltaOut, ToolCallOut
from server.streaming import Choice, Delta
from tokenization.tool_calls import ToolCallStream, parse_tool_calls


def opens_tool_calls(token_ids: list[int] | tuple[int, ...], tool_calls_id: int | None) -> bool:
    return tool_calls_id is not None and bool(token_ids) and token_ids[0] == tool_calls_id


Reply = tuple[str, list[ToolCallOut] | None, str | None]  # content, tool calls, finish reason


def collected_reply(choice: Choice, tool_calls_id: int | None) -> Reply:
    """(content, tool calls, finish reason) of a collected choice: a stream's rule, applied whole."""
    if not opens_tool_calls(choice.token_ids, tool_calls_id):
        return choice.text, None, choice.finish_reason
    stream = parse_tool_calls(choice.text)
    out = [
        ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
        for c in stream.calls
    ]
    return "", out or None, finish(choice.finish_reason, stream)


def finish(reason: str | None, stream: ToolCallStream) -> str | None:
    """`tool_calls` for a reply whose list of calls ended; a reply cut short keeps its reason
    (`length`, or `stop` for a stop string), and its calls so far are as a stream sent them."""
    return "tool_calls" if reason == "stop" and stream.closed else reason


@dataclass
class ToolCallChunks:
    """The streamed tool calls of each choice of one request. Whether a choice is a reply of
    calls is decided by its first token only (`tool_calls_id` is None when no tools are offered)."""

    tool_calls_id: int | None
    _streams: dict[int, ToolCallStream | None] = field(default_factory=dict)  # None: free text

    def take(self, delta: Delta) -> tuple[list[ToolCallDeltaOut] | None, str | None] | None:
        """For a choice of calls: its call deltas and finish reason; None for free text."""
        if delta.index not in self._streams:
            if not delta.token_ids:
                return None  # decided by the first delta that carries a token
            opens = opens_tool_calls(delta.token_ids, self.tool_calls_id)
            self._streams[delta.index] = ToolCallStream() if opens else None
        stream = self._streams[delta.index]
        if stream is None:
            return None
        out = [
            ToolCallDeltaOut(
                index=d.index,
                id=d.id,
                type="function" if d.id is not None else None,
                function=FunctionCallOut(name=d.name or "", arguments=d.arguments),
            )
            for d in stream.feed(delta.text)
        ]
        return out or None, finish(delta.finish_reason, stream)
