"""The contract every prompt encoder meets: validated chat messages in, prompt token ids out."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from tokenization.messages import ChatMessage
from tokenization.tool_calls import FunctionTool

# SentencePiece's word-boundary marker, which decodes to a space.
METASPACE = "\u2581"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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

    @property
    def tool_calls_id(self) -> int | None:
        """The control token that opens a reply's tool calls (`[TOOL_CALLS]`), or None without tools."""
        ...

    def encode_chat(self, messages: list[ChatMessage], tools: Sequence[FunctionTool] = ()) -> list[int]:
        """Encode a validated conversation into prompt ids (generation prompt or prefix included),
        with the tools it offers. Raises `UnsupportedFeatureError` for tools or tool calls on a
        tokenizer without tool tokens."""
        ...

    def encode_text(self, text: str, bos: bool) -> list[int]:
        """Encode plain text, with a leading BOS when `bos` is true and the tokenizer has one."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Decode ids into text, dropping special tokens."""
        ...

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a control token (BOS, EOS, `[INST]`, `<unk>`), never part of the text."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token contributes to the text, as OpenAI logprobs' `bytes` field wants.

        A leading-space marker (`▁`, GPT-2's `Ġ`) is a space, a byte-fallback token
        (`<0xE2>`) is its single byte, possibly part of a character split over several tokens; a
        special token is its own text (b"</s>") although `decode` drops it. Unlike `decode`, a token
        that opens the text keeps its leading space. An id the tokenizer has no token for gives b"".
        """
        ...


def metaspace_piece_bytes(piece: str, replacement: str = METASPACE, byte_fallback: bool = True) -> bytes:
    """The bytes of a SentencePiece-style piece: `replacement` is a space, `<0xNN>` the byte NN."""
    if byte_fallback:
        match = _BYTE_FALLBACK.fullmatch(piece)
        if match is not None:
            return bytes([int(match.group(1), 16)])
    return piece.replace(replacement, " ").encode("utf-8")
