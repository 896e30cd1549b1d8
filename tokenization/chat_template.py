"""Rendering of Hugging Face Jinja chat templates, the way transformers' `apply_chat_template` does.

The environment mirrors transformers 5 (`utils/chat_template_utils.py`): a sandboxed, immutable
Jinja environment with `trim_blocks`/`lstrip_blocks`, `loopcontrols`, a non-escaping `tojson`
filter and the `raise_exception` / `strftime_now` globals. A final assistant message is continued
like `continue_final_message=True`: a tag is appended to its content, the conversation is rendered
without a generation prompt, and the text is cut where the tag begins.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenization.errors import InvalidConversationError

# transformers' marker for the end of a message to continue (the trailing space matters).
CONTINUE_FINAL_MESSAGE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Older Jinja releases have known sandbox escapes; templates ship with checkpoints, so refuse them.
MIN_JINJA_VERSION = (3, 1, 6)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox configured like transformers'."""
    if _version_tuple(jinja2.__version__) < MIN_JINJA_VERSION:
        raise RuntimeError(f"chat templates need jinja2>=3.1.6, found {jinja2.__version__}")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTemplate:
    """A compiled chat template plus the special-token variables it is rendered with."""

    def __init__(self, source: str, variables: dict[str, str]) -> None:
        self.source = source
        self._template = compile_template(source)
        self._variables = dict(variables)

    def render(self, messages: list[dict[str, str]], continue_final_message: bool = False) -> str:
        """Render `messages` with a generation prompt, or continuing the final message's content.

        Raises:
            InvalidConversationError: when the template refuses the conversation (`raise_exception`)
                or drops the message to continue.
        """
        if not continue_final_message:
            return self._render(messages, add_generation_prompt=True)
        final = messages[-1]["content"]
        tagged = [*messages[:-1], {**messages[-1], "content": final + CONTINUE_FINAL_MESSAGE_TAG}]
        rendered = self._render(tagged, add_generation_prompt=False)
        return _cut_at_tag(rendered, final)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._variables,
            )
        except jinja2.exceptions.TemplateError as error:
            raise InvalidConversationError(f"chat template refused the conversation: {error}") from error


def _cut_at_tag(rendered: str, final: str) -> str:
    tag = CONTINUE_FINAL_MESSAGE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise InvalidConversationError("the chat template drops the final message, so it cannot be continued")
    location = rendered.rindex(tag)
    if rendered[location : location + len(CONTINUE_FINAL_MESSAGE_TAG)] == CONTINUE_FINAL_MESSAGE_TAG:
        return rendered[:location]
    # The template trimmed the trailing space after the tag, so it trims the message's end too.
    return rendered[:location].rstrip()
