"""Prompt encoding for Mistral checkpoints with mistral-common, Mistral's official encoder.

Mixtral 8x7B uses the v1 SentencePiece tokenizer: `<s>[INST] {system}\\n\\n{user} [/INST]{answer}</s>...`.
An HF checkpoint ships it as a plain `tokenizer.model`, which we load explicitly as v1 (after
checking its vocabulary size) rather than relying on mistral-common's deprecated filename fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.instruct import (
    InstructTokenizerV1,
    InstructTokenizerV2,
    InstructTokenizerV3,
)
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from pydantic import ValidationError

from tokenization.errors import InvalidConversationError, TokenizerNotFoundError, UnsupportedFeatureError
from tokenization.messages import ChatMessage, tool_message_index
from tokenization.prompt_encoder import metaspace_piece_bytes
from tokenization.tool_calls import TOOL_CALLS_TOKEN, FunctionTool

_INSTRUCT = {
    TokenizerVersion.v1: InstructTokenizerV1,
    TokenizerVersion.v2: InstructTokenizerV2,
    TokenizerVersion.v3: InstructTokenizerV3,
}

PLAIN_SENTENCEPIECE_NAME = "tokenizer.model"
V1_VOCAB_SIZE = 32000
V2_VOCAB_SIZE = 32768  # v2 and v3
V3_CONTROLS = frozenset({"[PREFIX]", "[MIDDLE]", "[SUFFIX]"})  # v3's fill-in-the-middle controls
LATER_CONTROL = "[SYSTEM_PROMPT]"  # v7 and later
JSON_LIST_TOOL_CALLS = frozenset({TokenizerVersion.v2, TokenizerVersion.v3, TokenizerVersion.v7})
# Serving-mode validation insists on a model name; which one does not change the encoding.
_REQUEST_MODEL_NAME = "served-model"

MistralMessage = SystemMessage | UserMessage | AssistantMessage | ToolMessage


def sentencepiece_version(spm: SentencePieceTokenizer) -> TokenizerVersion | None:
    """The mistral-common version of a SentencePiece model, from the model itself: v1 has 32000
    pieces and only `<s>`, `</s>` as controls; v2 and v3 have 32768 with the tool tokens, and v3
    also the fill-in-the-middle controls; v7 adds `[SYSTEM_PROMPT]`, and its variants are told
    apart only by name. None for anything but v1, v2 and v3."""
    controls = {spm.id_to_piece(t) for t in spm.special_ids}
    if spm.n_words == V1_VOCAB_SIZE and "[INST]" not in controls:
        return TokenizerVersion.v1
    if spm.n_words == V2_VOCAB_SIZE and TOOL_CALLS_TOKEN in controls and LATER_CONTROL not in controls:
        return TokenizerVersion.v3 if controls >= V3_CONTROLS else TokenizerVersion.v2
    return None  # v7 and later share v3's size: only their file names tell them apart


def load_plain_sentencepiece(path: Path) -> MistralTokenizer:
    """Load an unversioned SentencePiece `tokenizer.model` (as published checkpoints ship it),
    its version read from the model (`sentencepiece_version`) rather than from a file name.

    Raises:
        TokenizerNotFoundError: when the model is none of Mistral's v1, v2 or v3 tokenizers.
    """
    probe = SentencePieceTokenizer(path, tokenizer_version=TokenizerVersion.v1)
    version = sentencepiece_version(probe)
    if version is None:
        raise TokenizerNotFoundError(
            f"{path} has {probe.n_words} tokens and is none of Mistral's v1, v2 or v3 SentencePiece "
            "tokenizers; rename it tokenizer.model.vN with its mistral-common version"
        )
    spm = probe if version == TokenizerVersion.v1 else SentencePieceTokenizer(path, tokenizer_version=version)
    return MistralTokenizer(
        _INSTRUCT[version](spm),
        validator=get_validator(version, mode=ValidationMode.serving),
        request_normalizer=get_normalizer(version),
    )


def load_mistral_tokenizer(path: Path) -> MistralTokenizer:
    """Load a tekken JSON, a versioned `tokenizer.model.vN`, or a plain v1 `tokenizer.model`."""
    if path.name == PLAIN_SENTENCEPIECE_NAME:
        return load_plain_sentencepiece(path)
    return MistralTokenizer.from_file(path, mode=ValidationMode.serving)


def to_mistral_message(message: ChatMessage) -> MistralMessage:
    """Convert a validated `ChatMessage` into the matching mistral-common message object."""
    if message.role == "system":
        return SystemMessage(content=message.content)
    if message.role == "user":
        return UserMessage(content=message.content)
    if message.role == "assistant":
        calls = [
            ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in message.tool_calls
        ]
        return AssistantMessage(
            content=message.content or None, tool_calls=calls or None, prefix=message.prefix
        )
    return ToolMessage(content=message.content, tool_call_id=message.tool_call_id, name=message.name)


def _mistral_tool(tool: FunctionTool) -> Tool:
    return Tool(
        function=Function(name=tool.name, description=tool.description, parameters=dict(tool.parameters))
    )


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

    @property
    def tool_calls_id(self) -> int | None:
        """The `[TOOL_CALLS]` control token's id, for the versions whose replies write calls as a
        JSON list after it (v2, v3, v7; v11 and later write `name[ARGS]...`: not served yet)."""
        if self.version not in JSON_LIST_TOOL_CALLS:
            return None
        return self._text_tokenizer.get_special_token(TOOL_CALLS_TOKEN)

    def encode_chat(self, messages: list[ChatMessage], tools: Sequence[FunctionTool] = ()) -> list[int]:
        """Encode a conversation (and the tools it offers) with mistral-common; its refusals become
        InvalidConversationError."""
        where = tool_message_index(messages)
        if not self.supports_tools and (tools or where is not None):
            raise UnsupportedFeatureError(f"tokenizer {self.version.value} has no tool tokens", where)
        try:
            request = ChatCompletionRequest(
                messages=[to_mistral_message(message) for message in messages],
                tools=[_mistral_tool(tool) for tool in tools] or None,
                model=_REQUEST_MODEL_NAME,
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
