"""The vocabulary as a grammar engine must see it, built from the bytes our encoders already give.

A grammar constrains text, so the grammar engine needs, for every token id, the exact bytes that
token adds to the reply (`PromptEncoder.token_bytes`: `▁` is a space, `<0xE2>` is one byte of a
character split over tokens), which ids are control tokens (EOS, `[INST]`: never text, though a
grammar may force EOS), and two rules of the tokenizer:
- whether decoding drops the leading space of a reply's first token. SentencePiece writes a text's
  start as `▁{`, and the reply's text then starts with `{`, so a grammar that wants `{` first must
  accept `▁{` as the first token (and `{` too);
- how to write a text as tokens exactly, in the middle of a reply (`exact_tokenize`): the canonical
  tokens of text the grammar forces, and of an assistant `prefix` the reply continues.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenization.prompt_encoder import PromptEncoder

# A text SentencePiece's dummy prefix cannot merge with: "\n" is its own byte token in Mistral's
# tokenizers and a token of its own in byte-level BPE, so tokens after it spell the rest exactly.
_SENTINEL = "\n"
_SENTINEL_SPELLINGS = (b"\n", b" \n")  # with or without the dummy prefix's space


@dataclass(frozen=True, slots=True)
class TokenVocabulary:
    """Every token's bytes and the tokenizer's text rules, for one served model's tokenizer."""

    tokens: tuple[bytes, ...]  # token id -> the bytes it adds to the text (a control token: its name)
    special_ids: frozenset[int]  # control tokens: never part of the text
    eos_id: int
    bos_id: int | None
    strips_leading_space: bool  # decoding drops one leading space of the text's first token
    _encoder: PromptEncoder = field(repr=False, compare=False)
    _by_bytes: dict[bytes, int] = field(init=False, repr=False, compare=False)
    _longest: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_bytes: dict[bytes, int] = {}
        for token_id, data in enumerate(self.tokens):
            if data and token_id not in self.special_ids:
                by_bytes.setdefault(data, token_id)
        object.__setattr__(self, "_by_bytes", by_bytes)
        object.__setattr__(self, "_longest", max(map(len, by_bytes), default=1))

    @property
    def size(self) -> int:
        return len(self.tokens)

    def encode_start(self, text: str) -> list[int]:
        """`text` as the tokenizer writes the start of a reply (SentencePiece: with its `▁` prefix)."""
        return self._encoder.encode_text(text, bos=False)

    def exact_tokenize(self, text: str) -> list[int]:
        """Tokens whose bytes spell `text` exactly, as the tokenizer writes it after other text.

        Encodes `"\\n" + text` and drops the tokens that spell the sentinel, so SentencePiece's
        dummy prefix lands on the sentinel; where the boundary does not fall between tokens,
        falls back to a greedy longest match over the vocabulary.
        """
        if not text:
            return []
        data = text.encode("utf-8")
        ids = self._encoder.encode_text(_SENTINEL + text, bos=False)
        spelled = b""
        for k, token_id in enumerate(ids):
            spelled += self.tokens[token_id]
            if spelled in _SENTINEL_SPELLINGS:
                rest = ids[k + 1 :]
                if b"".join(self.tokens[t] for t in rest) == data:
                    return rest
                break
        return self._greedy(data)

    def _greedy(self, data: bytes) -> list[int]:
        ids: list[int] = []
        at = 0
        while at < len(data):
            for width in range(min(self._longest, len(data) - at), 0, -1):
                token_id = self._by_bytes.get(data[at : at + width])
                if token_id is not None:
                    ids.append(token_id)
                    at += width
                    break
            else:
                raise ValueError(f"no token spells byte {data[at]:#04x}")
        return ids


def build_vocabulary(encoder: PromptEncoder) -> TokenVocabulary:
    """The grammar engine's view of `encoder`'s tokenizer (about 0.2 s for 32k tokens)."""
    size = encoder.vocab_size
    # EOS, BOS and end-of-turn tokens are control tokens even where a tokenizer does not flag
    # them: a grammar must never let one pass for text (the scheduler stops on it).
    ends = {encoder.eos_id, *encoder.stop_token_ids, *([] if encoder.bos_id is None else [encoder.bos_id])}
    special = frozenset(t for t in range(size) if t in ends or encoder.is_special(t))
    tokens = tuple(encoder.token_bytes(t) for t in range(size))
    return TokenVocabulary(
        tokens, special, encoder.eos_id, encoder.bos_id, _strips_leading_space(encoder), encoder
    )


def _strips_leading_space(encoder: PromptEncoder) -> bool:
    """Whether a text's first token carries a leading space that decoding drops (SentencePiece's
    dummy prefix, HF Metaspace with `prepend_scheme: first`), found by encoding one word."""
    ids = encoder.encode_text("a", bos=False)
    if not ids:
        return False
    first = encoder.token_bytes(ids[0])
    return first.startswith(b" ") and not encoder.decode(ids[:1]).startswith(" ")
