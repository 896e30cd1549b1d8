"""Prompt encoding for non-Mistral checkpoints: HF `tokenizers` plus the checkpoint's Jinja chat template.

The rendered prompt is encoded without added special tokens (the template writes them), matching
`AutoTokenizer.apply_chat_template(..., tokenize=True)`. Consecutive same-role messages are merged
first, with mistral-common's rule, so a conversation means the same thing on both encoders.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from tokenization.chat_template import ChatTemplate
from tokenization.errors import TokenizerNotFoundError, UnsupportedFeatureError
from tokenization.messages import ChatMessage, merge_consecutive, tool_message_index
from tokenization.prompt_encoder import METASPACE, metaspace_piece_bytes
from tokenization.tool_calls import FunctionTool

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_JSON = "generation_config.json"
# Special tokens transformers exposes to templates (its `special_tokens_map`).
TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# End-of-turn tokens of common template families; one counts as a stop token when the template uses it.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|END_OF_TURN_TOKEN|>",
)


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from `path`, or return {} when the file does not exist."""
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else {}


def load_template_source(model_dir: Path, tokenizer_config: dict[str, Any]) -> str:
    """Find the chat template: `chat_template.jinja` (transformers 5) or `tokenizer_config.json`."""
    template_file = model_dir / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    source = tokenizer_config.get("chat_template")
    if isinstance(source, list):
        # Several named templates: the chat one is called "default".
        source = next((item.get("template") for item in source if item.get("name") == "default"), None)
    if not isinstance(source, str):
        raise TokenizerNotFoundError(
            f"{model_dir} has no chat template ({CHAT_TEMPLATE_FILE} or tokenizer_config)"
        )
    return source


def special_token_strings(tokenizer_config: dict[str, Any]) -> dict[str, str]:
    """The template variables `bos_token`, `eos_token`, ... as strings (older configs store objects)."""
    tokens: dict[str, str] = {}
    for key in TEMPLATE_TOKEN_KEYS:
        value = tokenizer_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens


def _generation_eos_ids(generation_config: dict[str, Any]) -> list[int]:
    value = generation_config.get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    return [item for item in values if isinstance(item, int)]


def _stop_token_ids(
    tokenizer: Tokenizer, eos_id: int, template: str, generation_eos: list[int]
) -> tuple[int, ...]:
    ids = [eos_id, *generation_eos]
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token in template and token_id is not None:
            ids.append(token_id)
    return tuple(dict.fromkeys(ids))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte's printable stand-in character (space is `Ġ`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shift)
            shift += 1
    return table


_UNICODE_TO_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}


def _byte_level_piece_bytes(piece: str) -> bytes:
    # A character outside the alphabet (a token added to the model vocabulary) stands for itself.
    to_byte = _UNICODE_TO_BYTE
    return b"".join(bytes([to_byte[char]]) if char in to_byte else char.encode("utf-8") for char in piece)


def _decoder_steps(state: dict[str, Any]) -> list[dict[str, Any]]:
    if state.get("type") == "Sequence":
        return [step for inner in state.get("decoders", []) for step in _decoder_steps(inner)]
    return [state]


class _PieceDecoder:
    """Maps a vocabulary piece to its bytes the way the tokenizer's decoder would."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        decoder = tokenizer.decoder
        steps = _decoder_steps(json.loads(decoder.__getstate__())) if decoder is not None else []
        types = {step.get("type") for step in steps}
        self.byte_level = "ByteLevel" in types
        self.byte_fallback = "ByteFallback" in types
        self.replacement = METASPACE
        for step in steps:
            if step.get("type") == "Metaspace":
                self.replacement = step.get("replacement", METASPACE)
            elif step.get("type") == "Replace" and step.get("content") == " ":
                self.replacement = step.get("pattern", {}).get("String", METASPACE)

    def piece_bytes(self, piece: str) -> bytes:
        if self.byte_level:
            return _byte_level_piece_bytes(piece)
        return metaspace_piece_bytes(piece, self.replacement, self.byte_fallback)


def _template_message(message: ChatMessage) -> dict[str, str]:
    data = {"role": message.role, "content": message.content}
    if message.name is not None:
        data["name"] = message.name
    if message.tool_call_id is not None:
        data["tool_call_id"] = message.tool_call_id
    return data


class HFPromptEncoder:
    """`PromptEncoder` backed by a `tokenizers.Tokenizer` and a Jinja chat template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        bos_id: int | None,
        eos_id: int,
        stop_ids: tuple[int, ...],
    ) -> None:
        self._tokenizer = tokenizer
        self._template = template
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._stop_ids = stop_ids
        added = tokenizer.get_added_tokens_decoder()
        self._added_tokens = {i: token.content for i, token in added.items()}
        self._special_ids = frozenset(i for i, token in added.items() if token.special)
        self._piece_decoder = _PieceDecoder(tokenizer)
        self._token_bytes: dict[int, bytes] = {}  # filled lazily by token_bytes

    @classmethod
    def from_dir(cls, model_dir: Path) -> HFPromptEncoder:
        """Load `tokenizer.json`, `tokenizer_config.json`, the chat template and `generation_config.json`."""
        tokenizer_file = model_dir / TOKENIZER_JSON
        if not tokenizer_file.is_file():
            raise TokenizerNotFoundError(f"{model_dir} has no {TOKENIZER_JSON}")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        config = read_json(model_dir / TOKENIZER_CONFIG_JSON)
        source = load_template_source(model_dir, config)
        tokens = special_token_strings(config)
        generation_eos = _generation_eos_ids(read_json(model_dir / GENERATION_CONFIG_JSON))
        eos_id = tokenizer.token_to_id(tokens["eos_token"]) if "eos_token" in tokens else None
        eos_id = eos_id if eos_id is not None else next(iter(generation_eos), None)
        if eos_id is None:
            raise TokenizerNotFoundError(
                f"{model_dir} names no EOS token in tokenizer_config or generation_config"
            )
        bos_id = tokenizer.token_to_id(tokens["bos_token"]) if "bos_token" in tokens else None
        stop_ids = _stop_token_ids(tokenizer, eos_id, source, generation_eos)
        return cls(tokenizer, ChatTemplate(source, tokens), bos_id, eos_id, stop_ids)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence token id, or None when the tokenizer has none."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """End-of-sequence token id."""
        return self._eos_id

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """EOS, generation_config's EOS ids and the template's end-of-turn token."""
        return self._stop_ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def supports_tools(self) -> bool:
        """Tool calling is not wired through templates yet."""
        return False

    def render(self, messages: list[ChatMessage]) -> str:
        """Render the prompt text: generation prompt, or the final `prefix` message left open."""
        merged = merge_consecutive(messages)
        return self._template.render(
            [_template_message(m) for m in merged], continue_final_message=merged[-1].prefix
        )

    @property
    def tool_calls_id(self) -> int | None:
        return None

    def encode_chat(self, messages: list[ChatMessage], tools: Sequence[FunctionTool] = ()) -> list[int]:
        """Render the conversation and encode it without adding special tokens."""
        where = tool_message_index(messages)
        if tools or where is not None:
            raise UnsupportedFeatureError("tool calls need a Mistral tokenizer with tool tokens", where)
        return self._tokenizer.encode(self.render(messages), add_special_tokens=False).ids

    def encode_text(self, text: str, bos: bool) -> list[int]:
        """Encode plain text without the tokenizer's post-processor, optionally after BOS."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self._bos_id, *ids] if bos and self._bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        """Decode ids, skipping special tokens."""
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def is_special(self, token_id: int) -> bool:
        """Added tokens marked special (see `PromptEncoder.is_special`)."""
        return token_id in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` adds to the text (see `PromptEncoder.token_bytes`); cached per id."""
        cached = self._token_bytes.get(token_id)
        if cached is None:
            cached = self._token_bytes[token_id] = self._compute_token_bytes(token_id)
        return cached

    def _compute_token_bytes(self, token_id: int) -> bytes:
        added = self._added_tokens.get(token_id)
        if added is not None:  # special and added tokens decode to their content as written
            return added.encode("utf-8")
        piece = self._tokenizer.id_to_token(token_id) if token_id >= 0 else None
        return b"" if piece is None else self._piece_decoder.piece_bytes(piece)
