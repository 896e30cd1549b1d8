"""What a request's output must be, checked and bounded before any grammar is built. No torch."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from engine.errors import RequestRejected

# Bounds on a schema (RELIABILITY.md item 9): a request cannot make the grammar compiler do
# unbounded work. Both are checked in one pass before anything is compiled.
MAX_SCHEMA_BYTES = 64 * 1024  # as compact JSON text
MAX_SCHEMA_DEPTH = 32  # nested objects and arrays in the schema document

SCHEMA_PARAM = "response_format.json_schema.schema"
# llguidance reads its compile options (separators, whitespace, leniency) from this key of a
# schema; they are the server's to set (compact JSON, nothing ignored), so a schema may not.
ENGINE_OPTIONS_KEY = "x-guidance"


class InvalidStructuredOutput(RequestRejected):
    """A `response_format` the engine cannot enforce: `param` names the field, the message the cause."""

    def __init__(self, message: str, param: str = SCHEMA_PARAM) -> None:
        super().__init__(f"{param}: {message}", "invalid_response_format", param=param)


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """Any JSON object (`json_object`), an instance of a JSON schema (`json_schema`), or a text of
    a grammar the server writes (`lark`, llguidance's Lark: tool calls).

    `schema` is the schema as compact JSON text, key order kept, or the Lark text (it is also the
    grammar cache key: two requests with the same one share one compiled grammar).
    """

    kind: Literal["json_object", "json_schema", "lark"]
    schema: str = ""
    param: str = SCHEMA_PARAM  # the request field a compile error names

    @classmethod
    def lark(cls, grammar: str, param: str) -> StructuredOutput:
        """A grammar of the server's own (never a client's text: it may name control tokens),
        built from the request field `param` (tools)."""
        return cls("lark", grammar, param)

    @classmethod
    def json_object(cls) -> StructuredOutput:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any], param: str = SCHEMA_PARAM) -> StructuredOutput:
        """Raises `InvalidStructuredOutput` (naming `param`) for a schema past the size or depth
        bound, or one that sets the grammar engine's options."""
        if not isinstance(schema, Mapping):
            raise InvalidStructuredOutput("must be a JSON object", param)
        depth, engine_options = _shape(schema)
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidStructuredOutput(f"nested {depth} levels deep; at most {MAX_SCHEMA_DEPTH}", param)
        if engine_options:
            raise InvalidStructuredOutput(
                f"{ENGINE_OPTIONS_KEY} is not accepted: the grammar engine's options are the server's", param
            )
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        size = len(text.encode("utf-8"))
        if size > MAX_SCHEMA_BYTES:
            raise InvalidStructuredOutput(f"{size} bytes as JSON; at most {MAX_SCHEMA_BYTES}", param)
        return cls("json_schema", text, param)


def _shape(document: object) -> tuple[int, bool]:
    """Nesting depth of objects and arrays (counted up to just past the bound), and whether any
    object carries `x-guidance`; iterative, so a hostile document cannot overflow the stack."""
    deepest, engine_options = 0, False
    stack: list[tuple[object, int]] = [(document, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, Mapping):
            engine_options = engine_options or ENGINE_OPTIONS_KEY in node
            children: list[object] = list(node.values())
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_SCHEMA_DEPTH:
            return deepest, engine_options
        stack.extend((child, level + 1) for child in children)
    return deepest, engine_options
