"""The grammar interface over llguidance, with our own view of the vocabulary.

vLLM hands llguidance a Hugging Face tokenizer and SentencePiece vocabularies to xgrammar, and
both have mis-mapped tokens of Mistral tokenizers. We give llguidance the bytes our encoders
compute and test (`tokenization.vocabulary`):
- every token's exact bytes; control tokens as llguidance's special tokens (a 0xFF marker byte
  and their name), so a grammar can force EOS but never match it as text;
- the one byte-fallback token for 0xFF, which collides with that marker, is marked special too:
  0xFF never occurs in UTF-8, so no text can contain it;
- the canonical tokens of forced text, from the tokenizer itself (`exact_tokenize`);
- SentencePiece's first-token rule: a reply's first token is written `▁{` and decoded `{`, so
  the first mask also allows every token whose bytes after one leading space start an instance
  (a second view of the vocabulary, with that space removed, gives those tokens).

JSON is compact (no whitespace between tokens, `,` and `:`): with flexible whitespace a weak model
can emit spaces forever. Unimplemented keywords are errors (`lenient: false`), so no part of a
schema is ever ignored. A schema cannot set these options (`x-guidance` is refused in `spec`).

A matcher that breaks (a grammar past llguidance's limits mid-reply) allows only EOS; the
sequence then fails instead of stopping: `accept` refuses every token of a broken matcher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import llguidance
import numpy as np

from engine.structured.spec import InvalidStructuredOutput, StructuredOutput
from tokenization.vocabulary import TokenVocabulary

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "lenient": False}
_ANY_OBJECT = '{"type":"object"}'
_MARKER = b"\xff"  # llguidance's special-token marker


class _TokenizerView:
    """What `llguidance.TokenizerWrapper` reads: token bytes, special ids, EOS, and a tokenizer."""

    def __init__(
        self,
        tokens: list[bytes],
        special_ids: Sequence[int],
        vocab: TokenVocabulary,
        tokenize: Callable[[str], list[int]],
    ) -> None:
        self.tokens = tokens
        self.special_token_ids = list(special_ids)
        self.eos_token_id = vocab.eos_id
        self.bos_token_id = vocab.bos_id
        self._tokenize = tokenize

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # the wrapper probes with bytes: it must then pass str
            raise TypeError("text only")
        return self._tokenize(text)


def _llguidance_tokens(vocab: TokenVocabulary, size: int, strip_space: bool) -> tuple[list[bytes], list[int]]:
    """Token bytes as llguidance wants them, padded to the model's `size` logits, and the special ids.

    With `strip_space`, the view of a reply's first token: one leading space removed (a lone
    space becomes unusable: decoded first, it is no text at all).
    """
    tokens: list[bytes] = []
    special: list[int] = []
    for token_id in range(size):
        data = vocab.tokens[token_id] if token_id < vocab.size else b""
        if strip_space and token_id not in vocab.special_ids and data.startswith(b" "):
            data = data[1:]
        if token_id in vocab.special_ids:
            data = _MARKER + (data or f"<special_{token_id}>".encode())
            special.append(token_id)
        elif not data or data.startswith(_MARKER):  # no token, a lone stripped space, byte 0xFF
            data = _MARKER + f"<unusable_{token_id}>".encode()
            special.append(token_id)
        tokens.append(data)
    return tokens, special


class LLGuidanceMatcher:
    """One sequence's llguidance matcher, with the first-token rule for its first token."""

    def __init__(
        self, matcher: llguidance.LLMatcher, first_mask: np.ndarray | None, vocab: TokenVocabulary
    ) -> None:
        self._matcher = matcher
        self._first_mask = first_mask  # until the first token: the precomputed first mask
        self._vocab = vocab

    def fill_bitmask(self, row: np.ndarray) -> None:
        if self._first_mask is not None:
            row[:] = self._first_mask
        else:
            self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept(self, token_id: int) -> bool:
        matcher = self._matcher
        if matcher.is_error():  # broken while computing its mask: EOS would end a partial reply
            return False
        first, self._first_mask = self._first_mask is not None, None
        if not first or not self._vocab.strips_leading_space:
            return matcher.consume_token(token_id)
        if matcher.validate_tokens([token_id]) == 1:
            return matcher.consume_token(token_id)
        data = self._vocab.tokens[token_id] if token_id < self._vocab.size else b""
        if not data.startswith(b" ") or token_id in self._vocab.special_ids:
            return matcher.consume_token(token_id)  # not allowed either way: the matcher says so
        try:
            text = data[1:].decode("utf-8")
        except UnicodeDecodeError:  # a piece of a character: it cannot start a reply's text
            return False
        return matcher.consume_tokens(self._vocab.exact_tokenize(text))

    @property
    def is_finished(self) -> bool:
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class LLGuidanceGrammar:
    def __init__(self, backend: LLGuidanceBackend, template: llguidance.LLMatcher, first: np.ndarray) -> None:
        self._backend = backend
        self._template = template  # never advanced: each sequence matches on a copy
        self._first_mask = first  # [W] int32: what a reply may start with

    def matcher(self, prefix: str = "") -> LLGuidanceMatcher:
        matcher = self._template.deep_copy()
        vocab = self._backend.vocab
        if not prefix:
            return LLGuidanceMatcher(matcher, self._first_mask, vocab)
        if not matcher.consume_tokens(vocab.exact_tokenize(prefix)) or matcher.is_error():
            raise InvalidStructuredOutput("the assistant prefix does not start a valid reply", "messages")
        return LLGuidanceMatcher(matcher, None, vocab)


class LLGuidanceBackend:
    """Compiles JSON schemas with llguidance for one vocabulary of `vocab_size` logits."""

    name = "llguidance"

    def __init__(self, vocab: TokenVocabulary, vocab_size: int) -> None:
        self.vocab = vocab
        self.vocab_size = max(vocab_size, vocab.size)
        self.mask_words = (self.vocab_size + 31) // 32
        self._limits = llguidance.LLParserLimits()
        self._tokenizer = self._tokenizer_for(strip_space=False, tokenize=vocab.exact_tokenize)
        self._start_tokenizer = (
            self._tokenizer_for(strip_space=True, tokenize=vocab.encode_start)
            if vocab.strips_leading_space
            else None
        )

    def _tokenizer_for(
        self, strip_space: bool, tokenize: Callable[[str], list[int]]
    ) -> llguidance.LLTokenizer:
        tokens, special = _llguidance_tokens(self.vocab, self.vocab_size, strip_space)
        view = _TokenizerView(tokens, special, self.vocab, tokenize)
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(view), n_vocab=self.vocab_size)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary (tests compare it with the encoders' bytes)."""
        return self._tokenizer

    def compile(self, spec: StructuredOutput) -> LLGuidanceGrammar:
        if spec.kind == "lark":
            grammar = llguidance.LLMatcher.grammar_from_lark(spec.schema)
        else:
            schema = spec.schema if spec.kind == "json_schema" else _ANY_OBJECT
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
            except ValueError as exc:
                raise InvalidStructuredOutput(str(exc), spec.param) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self._tokenizer, limits=self._limits
        )
        if is_error or messages:  # a warning names a part of the schema that would not be enforced
            raise InvalidStructuredOutput(f"cannot be enforced: {'; '.join(messages)}", spec.param)
        template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=self._limits)
        if template.is_error():
            raise InvalidStructuredOutput(f"cannot be enforced: {template.get_error()}", spec.param)
        first = self._initial_mask(template, spec)
        if self._start_tokenizer is not None:
            start = llguidance.LLMatcher(self._start_tokenizer, grammar, log_level=0, limits=self._limits)
            first |= self._initial_mask(start, spec)
        return LLGuidanceGrammar(self, template, first)

    def _initial_mask(self, matcher: llguidance.LLMatcher, spec: StructuredOutput) -> np.ndarray:
        row = np.zeros(self.mask_words, dtype=np.int32)
        matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        if matcher.is_error():
            raise InvalidStructuredOutput(f"cannot be enforced: {matcher.get_error()}", spec.param)
        return row
