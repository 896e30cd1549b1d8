"""safe_prompt: Mistral's guardrail system prompt, word for word."""

from __future__ import annotations

from tokenization import SAFE_PROMPT, ChatMessage, with_safe_prompt


def test_safe_prompt_text() -> None:
    assert SAFE_PROMPT == (
        "Always assist with care, respect, and truth. "
        "Respond with utmost utility yet securely. "
        "Avoid harmful, unethical, prejudiced, or negative content. "
        "Ensure replies promote fairness and positivity."
    )


def test_with_safe_prompt_prepends_system_message() -> None:
    messages = [ChatMessage("system", "Be nice"), ChatMessage("user", "Hi")]
    assert with_safe_prompt(messages) == [ChatMessage("system", SAFE_PROMPT), *messages]
    assert len(messages) == 2
