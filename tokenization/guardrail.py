"""The `safe_prompt` guardrail: Mistral's system prompt, word for word."""

from __future__ import annotations

from tokenization.messages import ChatMessage

SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. "
    "Ensure replies promote fairness and positivity."
)


def with_safe_prompt(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Return `messages` with the guardrail system message prepended.

    The encoders join it with any other system message using "\\n\\n", as mistral-common does.
    """
    return [ChatMessage(role="system", content=SAFE_PROMPT), *messages]
