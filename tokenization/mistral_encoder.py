"""Prompt encoding for Mistral checkpoints with mistral-common, Mistral's official encoder.

Mixtral 8x7B uses the v1 SentencePiece tokenizer: `<s>[INST] {system}\\n\\n{user} [/INST]{answer}</s>...`.
An HF checkpoint ships it as a plain `tokenizer.model`, which we load explicitly as v1 (after
checking its vocabulary size) rather than relying on mistral-common's deprecated filename fallback.
"""

from __future__ import annotations

from pathlib import Path

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV1
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from pydantic import ValidationError

from tokenization.errors import InvalidConversationError, TokenizerNotFoundError
from tokenization.messages import ChatMessage
from tokenization.prompt_encoder import metaspace_piece_bytes

PLAIN_SENTENCEPIECE_NAME = "tokenizer.model"
V1_VOCAB_SIZE = 32000
# Serving-mode validation insists on a model name; which one does not change the encoding.
_REQUEST_MODEL_NAME = "served-model"

MistralMessage = SystemMessage | UserMessage | AssistantMessage | ToolMessage


def load_v1_sentencepiece(path: Path) -> MistralTokenizer:
    """Load an unversioned SentencePiece `tokenizer.model` as mistral-common's v1 tokenizer.

    Raises:
        TokenizerNotFoundError: when the vocabulary size is not v1's (32000): a v2/v3 file must be
            named `tokenizer.model.v2` / `.v3` so that its version is not guessed.
    """
    spm = SentencePieceTokenizer(path, tokenizer_version=TokenizerVersion.v1)
    if spm.n_words != V1_VOCAB_SIZE:
        raise TokenizerNotFoundError(
            f"{path} has {spm.n_words} tokens, not the {V1_VOCAB_SIZE} of Mistral's v1 tokenizer; "
            "rename it tokenizer.model.vN with its mistral-common version"
        )
    return MistralTokenizer(
        InstructTokenizerV1(spm),
        validator=get_validator(TokenizerVersion.v1, mode=ValidationMode.serving),
        request_normalizer=get_normalizer(TokenizerVersion.v1),
    )


def load_mistral_tokenizer(path: Path) -> MistralTokenizer:
    """Load a tekken JSON, a versioned `tokenizer.model.vN`, or a plain v1 `tokenizer.model`."""
    if path.name == PLAIN_SENTENCEPIECE_NAME:
        return load_v1_sentencepiece(path)
    return MistralTokenizer.from_file(path, mode=ValidationMode.serving)


def to_mistral_message(message: ChatMessage) -> MistralMessage:
    """Convert a validated `ChatMessage` into the matching mistral-common message object."""
    if message.role == "system":
        return SystemMessage(content=message.content)
    if message.role == "user":
        return UserMessage(content=message.content)
    if message.role == "assistant":
        return AssistantMessage(content=message.content, prefix=message.prefix)
    return ToolMessage(content=message.content, tool_call_id=message.tool_call_id, name=message.name)


class MistralPromptEncoder:
    """`PromptEncoder` backed by a `MistralTokenizer` in serving validation mode."""

    def __init__(self, tokenizer: MistralTokenizer) -> None:
        self._tokenizer = tokenizer
        self._text_tokenizer = tokenizer.instruct_tokenizer.tokenizer
        self._token_bytes: dict[int, bytes] = {}  # filled lazily by token_bytes

    @classmethod
    def from_file(cls, path: Path) -> MistralPromptEncoder:
        """Build an encoder from a tokenizer file (see `load_mistral_tokenizer`)."""
        return cls(load_mistral_tokenizer(path))

    @property
    def version(self) -> TokenizerVersion:
        """mistral-common tokenizer version (v1 for Mixtral 8x7B)."""
        return self._tokenizer.version

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence token id."""
        return self._text_tokenizer.bos_id

    @property
    def eos_id(self) -> int:
        """End-of-sequence token id (also ends every assistant turn)."""
        return self._text_tokenizer.eos_id

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Mistral instruct models end a turn with EOS only."""
        return (self.eos_id,)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self._text_tokenizer.n_words

    @property
    def supports_tools(self) -> bool:
        """v1 has no tool tokens; v2 and later do."""
        return self.version != TokenizerVersion.v1

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        """Encode a conversation with mistral-common; its refusals become InvalidConversationError."""
        try:
            request = ChatCompletionRequest(
                messages=[to_mistral_message(message) for message in messages], model=_REQUEST_MODEL_NAME
            )
            return list(self._tokenizer.encode_chat_completion(request).tokens)
        except (MistralCommonException, ValidationError) as error:
            raise InvalidConversationError(str(error)) from error

    def encode_text(self, text: str, bos: bool) -> list[int]:
        """Encode plain text (SentencePiece adds its leading-space marker), optionally after BOS."""
        return self._text_tokenizer.encode(text, bos=bos, eos=False)

    def decode(self, ids: list[int]) -> str:
        """Decode ids, skipping special tokens."""
        return self._tokenizer.decode(ids)

    def is_special(self, token_id: int) -> bool:
        """Control tokens and `<unk>` (see `PromptEncoder.is_special`)."""
        tokenizer = self._text_tokenizer
        if not 0 <= token_id < tokenizer.n_words:
            return False
        return tokenizer.is_special(token_id) or token_id == tokenizer.unk_id

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` adds to the text (see `PromptEncoder.token_bytes`); cached per id."""
        cached = self._token_bytes.get(token_id)
        if cached is None:
            cached = self._token_bytes[token_id] = self._compute_token_bytes(token_id)
        return cached

    def _compute_token_bytes(self, token_id: int) -> bytes:
        tokenizer = self._text_tokenizer
        if not 0 <= token_id < tokenizer.n_words:
            return b""
        if isinstance(tokenizer, Tekkenizer):  # byte-level: each token is a byte string already
            return tokenizer.id_to_byte_piece(token_id, SpecialTokenPolicy.KEEP)
        piece = tokenizer.id_to_piece(token_id)
        if self.is_special(token_id):
            return piece.encode("utf-8")  # <s>, </s>, [INST], <unk>: their own text
        return metaspace_piece_bytes(piece)
