"""`tools`, `tool_choice` and `parallel_tool_calls` of a chat request, checked field by field.

- `tools`: `[{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}]`;
- `tool_choice`: `auto` (the default), `none` (the tools are not even offered), `required` or
  `any` (mistral-common's older name for it), or `{"type": "function", "function": {"name"}}`;
- `parallel_tool_calls`: whether a reply may hold several calls (default true).
A reply under `required`, `any` or a named function is forced by a grammar over Mistral's
tool-call format and each function's parameters (`tokenization.tool_calls`), so it always parses
and validates; under `auto`, once the model writes `[TOOL_CALLS]`, the rest is constrained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jsonschema

from engine.structured import InvalidStructuredOutput, StructuredOutput
from server.errors import BadRequest
from tokenization.tool_calls import FUNCTION_NAME, FunctionTool, tool_call_grammar

CHOICES = ("auto", "none", "required", "any")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """The tools a request offers the model, and what it must do with them."""

    tools: tuple[FunctionTool, ...]
    choice: str  # auto, none, required, or function (then `function` names it)
    parallel: bool
    function: str | None = None

    @property
    def offered(self) -> tuple[FunctionTool, ...]:
        """The tools the prompt lists (none under `tool_choice: none`)."""
        return () if self.choice == "none" else self.tools

    def grammar(self, tool_calls_id: int) -> StructuredOutput:
        """What a reply must match when tools are offered."""
        forced = self.choice != "auto"
        tools = (
            [t for t in self.tools if t.name == self.function] if self.choice == "function" else self.tools
        )
        return StructuredOutput.lark(tool_call_grammar(tools, tool_calls_id, forced, self.parallel), "tools")


def _bad(message: str, param: str) -> BadRequest:
    return BadRequest(message, param=param, code="invalid_tools")


def _function(raw: object, i: int) -> FunctionTool:
    where = f"tools[{i}]"
    if not isinstance(raw, dict) or raw.get("type", "function") != "function":
        raise _bad(f"{where} must be {{'type': 'function', 'function': {{...}}}}", where)
    function = raw.get("function")
    if not isinstance(function, dict):
        raise _bad(f"{where}.function must be an object with a name", f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or FUNCTION_NAME.fullmatch(name) is None:
        raise _bad(
            f"{where}.function.name must be 1 to 64 letters, digits, _ or -; got {name!r}",
            f"{where}.function.name",
        )
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise _bad(f"{where}.function.description must be a string", f"{where}.function.description")
    parameters = function.get("parameters", EMPTY_PARAMETERS)
    param = f"{where}.function.parameters"
    if not isinstance(parameters, dict):
        raise _bad(f"{param} must be a JSON schema (an object)", param)
    try:
        StructuredOutput.json_schema(parameters, param)  # the size, depth and option bounds
        if not isinstance(parameters.get("$schema", ""), str):
            raise _bad(f"{param}.$schema must be a string", param)
        jsonschema.validators.validator_for(parameters).check_schema(parameters)
    except InvalidStructuredOutput as exc:
        raise _bad(str(exc), param) from None
    except jsonschema.SchemaError as exc:
        raise _bad(f"{param} is not a valid JSON schema: {exc.message}", param) from None
    return FunctionTool(name, parameters, description, bool(function.get("strict", False)))


def parse_tools(tools: object, tool_choice: object, parallel: object) -> ToolRequest | None:
    """The request's tools, or None when it offers none."""
    if tools is None or tools == []:
        if isinstance(tool_choice, dict) or tool_choice in ("required", "any"):
            raise _bad("tool_choice asks for a tool call, but the request has no tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise _bad("tools must be a list", "tools")
    functions = tuple(_function(raw, i) for i, raw in enumerate(tools))
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise _bad("tools: two functions have the same name", "tools")
    choice, named = _choice(tool_choice, names)
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    return ToolRequest(functions, choice, parallel is not False, named)


def _choice(value: object, names: list[str]) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    if isinstance(value, str):
        if value not in CHOICES:
            allowed = ", ".join(CHOICES)
            raise _bad(f"tool_choice must be one of {allowed} or a function; got {value!r}", "tool_choice")
        return ("required" if value == "any" else value), None
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        shape = "{'type': 'function', 'function': {'name'}}"
        raise _bad(f"tool_choice must be a string or name a function: {shape}", "tool_choice")
    if name not in names:
        raise _bad(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    return "function", name
