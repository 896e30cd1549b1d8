"""Tool calls in Mistral's format: ids, the grammar that forces a call, and the parser of a reply.

Tokenizers v2, v3 and v7 write a reply's tool calls as the control token `[TOOL_CALLS]` followed
by a JSON list, `[{"name": "f", "arguments": {...}}]`, then EOS. mistral-common encodes the
conversation (tools, calls, results); this module covers what it does not: the reply.
- Ids: mistral-common accepts only `^[a-zA-Z0-9]{9}$`. We generate 9-character ids; a client's
  longer id (OpenAI's `call_...`) is mapped to its last 9 characters, as vLLM does, and refused
  when those are not 9 letters or digits.
- The grammar (llguidance's Lark) that a reply under `required`, `any` or a named function must
  match: `[TOOL_CALLS]` and a JSON list of calls written as mistral-common writes them, each a
  listed function's name and arguments that validate against its `parameters`. Under `auto` the
  reply is free text, or `[TOOL_CALLS]` and that list.
- The parser of a reply's text after `[TOOL_CALLS]`, whole or incrementally (a stream's deltas:
  each call's name once it is complete, then fragments of its arguments as they come).
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TOOL_CALLS_TOKEN = "[TOOL_CALLS]"
MAX_PARALLEL_CALLS = 8  # calls in one reply (a model cannot call tools forever)
ID_KEY = '"id": "'  # v3 writes a call's id after its arguments
TOOL_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_ID_ALPHABET = string.ascii_letters + string.digits
_id_rng = random.SystemRandom()
# The JSON of calls as mistral-common writes them in a conversation (`json.dumps`' separators), which
# is what Mistral's models were trained to write after `[TOOL_CALLS]` (and SentencePiece's word
# marker before the list): nothing else between tokens, so a weak model cannot pad it forever.
TRAINED_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}


class ToolCallIdError(ValueError):
    """A client's tool-call id that no 9-character Mistral id can stand for."""


def new_tool_call_id() -> str:
    return "".join(_id_rng.choice(_ID_ALPHABET) for _ in range(9))


def mistral_tool_call_id(client_id: str) -> str:
    """The 9-character id mistral-common accepts for `client_id`: itself, or its last 9 characters."""
    mapped = client_id[-9:]
    if TOOL_CALL_ID.fullmatch(mapped) is None:
        raise ToolCallIdError(
            f"tool call id {client_id!r}: its last 9 characters must be letters or digits "
            "(Mistral's ids are 9 of them)"
        )
    return mapped


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """One function a request offers the model."""

    name: str
    parameters: Mapping[str, Any]
    description: str = ""
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call: its id, the function's name, and the arguments as JSON text."""

    id: str
    name: str
    arguments: str


def _lark_string(text: str) -> str:
    """`text` as a Lark string literal (JSON's escaping is Lark's)."""
    return json.dumps(text)


def tool_call_grammar(
    tools: Sequence[FunctionTool], tool_calls_id: int, forced: bool, parallel: bool = True
) -> str:
    """llguidance Lark: the `[TOOL_CALLS]` token (`tool_calls_id`), then a JSON list of calls as
    mistral-common writes them: `[{"name": "f", "arguments": {...}}, ...]`, each call's optional
    `"id"` after its arguments (v3 writes one in a conversation). Under `auto` (`forced` false),
    free text instead, which can never contain a control token.

    Each function's arguments are a `%json` rule of their own, so the `$ref`s of its `parameters`
    resolve against its own root. (Lark names a token by id, `<[5]>`: `<[TOOL_CALLS]>` would read
    as a malformed id.)
    """
    lines = []
    for i, tool in enumerate(tools):
        head = _lark_string(f'{{"name": "{tool.name}", "arguments": ')
        lines.append(
            f'call_{i}: {head} args_{i} ({_lark_string(", ")} {_lark_string(ID_KEY)} ID "\\"")? "}}"'
        )
        lines.append(f"args_{i}: %json {json.dumps(dict(tool.parameters) | {'x-guidance': TRAINED_JSON})}")
    more = f" ({_lark_string(', ')} call){{0,{MAX_PARALLEL_CALLS - 1}}}" if parallel else ""
    calls = [
        f'calls: "[" call{more} "]"',
        "call: " + " | ".join(f"call_{i}" for i in range(len(tools))),
        *lines,
        "ID: /[a-zA-Z0-9]{9}/",
    ]
    token = f"<[{tool_calls_id}]>"
    start = f'start: {token} " "? calls' if forced else f'start: TEXT | {token} " "? calls\nTEXT: /(?s:.+)/'
    return "\n".join([start, *calls]) + "\n"


def parse_tool_calls(text: str) -> ToolCallStream:
    """The calls of a reply's text after `[TOOL_CALLS]`, as a stream of the same reply parses
    them (arguments as the raw JSON text the model wrote); `closed` says whether the list ended."""
    stream = ToolCallStream()
    stream.feed(text)
    return stream


@dataclass(slots=True)
class ToolCallDelta:
    """What a piece of a streamed reply adds to call `index`: its id and name first, then text of
    its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class ToolCallStream:
    """Parses the compact JSON list after `[TOOL_CALLS]` as it streams, into `ToolCallDelta`s.

    The grammar writes each call as `{"name": "<name>", "arguments": <JSON>}` (and maybe its
    `"id"` after), so a call's name is
    known once `, "arguments": ` follows it, and its arguments are the JSON value after that;
    strings and escapes are tracked so brackets inside them do not count. A call's arguments
    stream as raw JSON text, the same text a collected reply gives.
    """

    calls: list[ToolCall] = field(default_factory=list)
    _buffer: str = ""
    _at: int = 0  # how much of the buffer is parsed
    _arguments: _JsonScanner | None = None  # scanning the last call's arguments

    def feed(self, text: str) -> list[ToolCallDelta]:
        self._buffer += text
        deltas: list[ToolCallDelta] = []
        while (delta := self._step()) is not None:
            deltas.append(delta)
        return deltas

    @property
    def closed(self) -> bool:
        """The list has ended: every call is complete (a reply cut short is not)."""
        return (
            bool(self.calls)
            and self._arguments is None
            and _LIST_END.fullmatch(self._buffer, self._at) is not None
        )

    def _step(self) -> ToolCallDelta | None:
        if self._arguments is None:
            match = _CALL_START.match(self._buffer, self._at)
            if match is None:
                return None
            self._at = match.end()
            self.calls.append(ToolCall(new_tool_call_id(), match.group(1), ""))
            self._arguments = _JsonScanner()
            return ToolCallDelta(len(self.calls) - 1, self.calls[-1].id, match.group(1))
        start = self._at
        self._at = self._arguments.scan(self._buffer, start)
        if self._arguments.done:
            self._arguments = None
        if self._at == start:
            return None if self._arguments is not None else self._step()
        last = self.calls[-1]
        piece = self._buffer[start : self._at]
        self.calls[-1] = ToolCall(last.id, last.name, last.arguments + piece)
        return ToolCallDelta(len(self.calls) - 1, arguments=piece)


# The start of a call: the list's `[` (after SentencePiece's space), or the previous call's end (its
# optional id, its `}`) and a comma; then its name. The list's end, likewise.
_AFTER_ARGUMENTS = r'(?:, "id": "[a-zA-Z0-9]{9}")?\}'
_CALL_START = re.compile(rf'(?: ?\[|{_AFTER_ARGUMENTS}, )\{{"name": "([a-zA-Z0-9_-]{{1,64}})", "arguments": ')
_LIST_END = re.compile(rf"{_AFTER_ARGUMENTS}\]")


@dataclass(slots=True)
class _JsonScanner:
    """Finds where one JSON value ends, across pieces of text."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    done: bool = False

    def scan(self, text: str, start: int) -> int:
        """Consume from `start`; the index just past what belongs to the value so far."""
        i = start
        while i < len(text) and not self.done:
            ch = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.done = True
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                if self.depth == 0:  # the enclosing call's brace: the value ended before it
                    self.done = True
                    return i
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
            elif ch == "," and self.depth == 0:
                self.done = True
                return i
            i += 1
        return i
