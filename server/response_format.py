"""`response_format` in the shapes the OpenAI and Mistral SDKs send, checked field by field.

- `{"type": "text"}` (or no `response_format`): free text;
- `{"type": "json_object"}`: any JSON object;
- `{"type": "json_schema", "json_schema": {"name", "description"?, "schema", "strict"?}}`: an
  instance of `schema`, enforced whatever `strict` says (constrained decoding never lets a reply
  leave the schema).
Each malformed field is a 400 that names it; a schema the grammar engine cannot enforce is a
400 from the engine's compile, naming the feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.structured import StructuredOutput
from server.errors import BadRequest

TYPES = ("text", "json_object", "json_schema")


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """What a request's `response_format` asks for: the engine's spec and the schema as sent."""

    structured: StructuredOutput | None  # None: free text
    schema: dict[str, Any] | None = None  # json_schema only, as the client wrote it


def _bad(message: str, param: str) -> BadRequest:
    return BadRequest(message, param=param, code="invalid_response_format")


def parse_response_format(raw: object) -> ResponseFormat:
    if raw is None:
        return ResponseFormat(None)
    if not isinstance(raw, dict):
        raise _bad("response_format must be an object", "response_format")
    kind = raw.get("type")
    if kind not in TYPES:
        raise _bad(
            f"response_format.type must be one of {', '.join(TYPES)}; got {kind!r}", "response_format.type"
        )
    if kind == "text":
        return ResponseFormat(None)
    if kind == "json_object":
        return ResponseFormat(StructuredOutput.json_object())
    spec = raw.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad(
            "response_format.json_schema must be an object with a name and a schema",
            "response_format.json_schema",
        )
    for field, kinds in (("name", str), ("description", str), ("strict", bool)):
        if spec.get(field) is not None and not isinstance(spec[field], kinds):
            raise _bad(
                f"response_format.json_schema.{field} must be a {kinds.__name__}",
                f"response_format.json_schema.{field}",
            )
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise _bad(
            "response_format.json_schema.schema must be a JSON schema (an object)",
            "response_format.json_schema.schema",
        )
    return ResponseFormat(StructuredOutput.json_schema(schema), schema)
