"""The contract every prompt encoder meets: validated chat messages in, prompt token ids out."""

from __future__ import annotations

from typing import Protocol

from tokenization.messages import ChatMessage


class PromptEncoder(Protocol):
    """Turns chats and text into token ids (and back) for one served model."""

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence token id, or None when the tokenizer has none."""
        ...

    @property
    def eos_id(self) -> int:
        """End-of-sequence token id."""
        ...

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Token ids that end generation (EOS and any end-of-turn token)."""
        ...

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        ...

    @property
    def supports_tools(self) -> bool:
        """Whether the tokenizer can encode tool definitions and tool calls."""
        ...

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        """Encode a validated conversation into prompt ids (generation prompt or prefix included)."""
        ...

    def encode_text(self, text: str, bos: bool) -> list[int]:
        """Encode plain text, with a leading BOS when `bos` is true and the tokenizer has one."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Decode ids into text, dropping special tokens."""
        ...
