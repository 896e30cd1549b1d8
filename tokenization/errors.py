"""Typed errors raised by the tokenization package.

The server maps `InvalidConversationError` to HTTP 400 and `TokenizerNotFoundError` to a startup failure.
"""

from __future__ import annotations


class InvalidConversationError(ValueError):
    """A chat request's messages cannot be encoded (bad structure, content or order).

    Attributes:
        message: What is wrong, without the location prefix.
        index: Index of the offending message in the request's `messages`, or None when the error is
            about the conversation as a whole.
    """

    def __init__(self, message: str, index: int | None = None) -> None:
        self.message = message
        self.index = index
        super().__init__(f"messages[{index}]: {message}" if index is not None else f"messages: {message}")


class UnsupportedFeatureError(InvalidConversationError):
    """A well-formed request uses a feature this server or tokenizer does not support (e.g. tool calls)."""


class TokenizerNotFoundError(FileNotFoundError):
    """A model directory holds no tokenizer this package knows how to load."""
