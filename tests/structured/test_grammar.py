"""The llguidance backend on Mistral's v1 vocabulary: what it compiles, refuses and allows."""

from __future__ import annotations

import asyncio
import json
import sys
import threading

import numpy as np
import pytest

from engine.structured import GrammarCompiler, InvalidStructuredOutput, StructuredOutput
from engine.structured.llguidance_backend import LLGuidanceBackend
from engine.structured.spec import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH
from tests.structured.schemas import SAMPLE_INSTANCES, SCHEMAS, UNSUPPORTED
from tests.tokenization.conftest import V1_MODEL
from tokenization.mistral_encoder import MistralPromptEncoder
from tokenization.vocabulary import TokenVocabulary, build_vocabulary

EOS = 2
INST = 3  # [INST] in v1 is a plain piece; the control tokens are 0..2


@pytest.fixture(scope="module")
def vocab() -> TokenVocabulary:
    return build_vocabulary(MistralPromptEncoder.from_file(V1_MODEL))


@pytest.fixture(scope="module")
def backend(vocab: TokenVocabulary) -> LLGuidanceBackend:
    return LLGuidanceBackend(vocab, vocab.size)


def allowed(matcher, words: int) -> set[int]:
    row = np.zeros(words, dtype=np.int32)
    matcher.fill_bitmask(row)
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    return set(np.flatnonzero(bits).tolist())


def compact(instance: object) -> str:
    return json.dumps(instance, separators=(",", ":"), ensure_ascii=False)


def test_the_corpus_is_large_and_bounded() -> None:
    assert len(SCHEMAS) >= 30 and set(SAMPLE_INSTANCES) == set(SCHEMAS)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_schema_compiles_and_accepts_a_valid_instance(backend: LLGuidanceBackend, vocab, name) -> None:
    grammar = backend.compile(StructuredOutput.json_schema(SCHEMAS[name]))
    matcher = grammar.matcher()
    for token in vocab.exact_tokenize(compact(SAMPLE_INSTANCES[name])):
        assert token in allowed(matcher, backend.mask_words), (name, vocab.tokens[token])
        assert matcher.accept(token), matcher.error
    assert EOS in allowed(matcher, backend.mask_words)  # complete: EOS may end it


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_a_feature_that_cannot_be_enforced_is_refused_by_name(backend: LLGuidanceBackend, name) -> None:
    with pytest.raises(InvalidStructuredOutput) as error:
        backend.compile(StructuredOutput.json_schema(UNSUPPORTED[name]))
    assert error.value.param == "response_format.json_schema.schema"
    assert "cannot be enforced" in str(error.value)


def test_unimplemented_keywords_are_named(backend: LLGuidanceBackend) -> None:
    schema = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}
    with pytest.raises(InvalidStructuredOutput, match=r"not"):
        backend.compile(StructuredOutput.json_schema(schema))


def test_size_and_depth_bounds_are_checked_before_compiling() -> None:
    deep: dict = {"type": "integer"}
    for _ in range(MAX_SCHEMA_DEPTH):
        deep = {"type": "array", "items": deep}
    with pytest.raises(InvalidStructuredOutput, match="levels deep"):
        StructuredOutput.json_schema(deep)
    properties = {f"p{i}": {"type": "integer"} for i in range(MAX_SCHEMA_BYTES // 10)}
    wide = {"type": "object", "properties": properties}
    with pytest.raises(InvalidStructuredOutput, match="bytes as JSON"):
        StructuredOutput.json_schema(wide)


def test_the_first_token_may_carry_sentencepieces_word_marker(backend: LLGuidanceBackend, vocab) -> None:
    """A reply starts `▁{` in SentencePiece and decodes to `{`: both tokens start a JSON object."""
    assert vocab.strips_leading_space
    grammar = backend.compile(StructuredOutput.json_object())
    first = allowed(grammar.matcher(), backend.mask_words)
    texts = {vocab.tokens[t] for t in first}
    assert b"{" in texts and b" {" in texts
    assert all(t.lstrip(b" ").startswith(b"{") for t in texts), texts
    spaced = vocab.tokens.index(b" {")
    matcher = grammar.matcher()
    assert matcher.accept(spaced)
    after = {vocab.tokens[t] for t in allowed(matcher, backend.mask_words)}
    assert b"}" in after and b' "' not in after  # compact JSON: the marker was the reply's start only


def test_control_tokens_never_match_text_and_eos_only_ends_an_instance(backend: LLGuidanceBackend, vocab):
    matcher = backend.compile(StructuredOutput.json_schema(SCHEMAS["flat_record"])).matcher()
    assert not allowed(matcher, backend.mask_words) & {0, 1, EOS}
    for token in vocab.exact_tokenize('{"name":"A"'):
        assert matcher.accept(token)
        assert EOS not in allowed(matcher, backend.mask_words)
    assert not matcher.is_finished


def test_whitespace_is_compact_and_a_schema_cannot_set_the_engines_options(backend, vocab) -> None:
    matcher = backend.compile(StructuredOutput.json_schema({"type": "object"})).matcher()
    assert matcher.accept(vocab.tokens.index(b"{"))
    after = {vocab.tokens[t] for t in allowed(matcher, backend.mask_words)}
    assert b'"' in after and not any(t.startswith((b" ", b"\n")) for t in after)
    for options in ({"whitespace_flexible": True}, {"item_separator": "x", "key_separator": "y"}):
        for schema in ({"type": "object", "x-guidance": options}, {"anyOf": [{"x-guidance": options}]}):
            with pytest.raises(InvalidStructuredOutput, match="x-guidance is not accepted"):
                StructuredOutput.json_schema(schema)


def test_end_of_turn_tokens_are_special_even_unflagged(vocab) -> None:
    assert {0, 1, EOS} <= vocab.special_ids


def test_a_prefix_is_consumed_first_and_must_start_an_instance(backend: LLGuidanceBackend, vocab) -> None:
    grammar = backend.compile(StructuredOutput.json_schema(SCHEMAS["flat_record"]))
    matcher = grammar.matcher('{"name":"Ad')
    for token in vocab.exact_tokenize('a","age":36,"active":true}'):
        assert matcher.accept(token)
    assert matcher.is_finished
    with pytest.raises(InvalidStructuredOutput) as error:
        grammar.matcher('{"age":')
    assert error.value.param == "messages"


def test_the_compiler_caches_by_spec_and_shares_a_compile(backend: LLGuidanceBackend) -> None:
    compiler = GrammarCompiler(backend, cache_size=2)
    specs = [StructuredOutput.json_schema(SCHEMAS[n]) for n in ("flat_record", "boolean", "null")]

    async def main() -> None:
        first, second = await asyncio.gather(compiler.compile(specs[0]), compiler.compile(specs[0]))
        assert first is second and compiler.num_compiled == 1
        assert compiler.get(StructuredOutput.json_schema(SCHEMAS["flat_record"])) is first  # equal: a hit
        await compiler.compile(specs[1])
        await compiler.compile(specs[2])  # evicts the least recently used
        assert compiler.cached(specs[0]) is None and compiler.num_compiled == 3
        with pytest.raises(InvalidStructuredOutput):
            await compiler.compile(StructuredOutput.json_schema(UNSUPPORTED["not"]))

    asyncio.run(main())
    compiler.close()


def test_a_cancelled_caller_leaves_the_compile_to_the_others(backend: LLGuidanceBackend) -> None:
    """A client that leaves while its schema waits for the compiler must not cancel the compile
    for the others waiting on it, nor poison the schema for later requests."""
    release = threading.Event()

    class Slow:
        mask_words = backend.mask_words
        name = "slow"

        def compile(self, spec):
            release.wait(5)
            return backend.compile(spec)

    compiler = GrammarCompiler(Slow())
    blocker, spec = (StructuredOutput.json_schema(SCHEMAS[n]) for n in ("boolean", "flat_record"))

    async def main() -> None:
        first = asyncio.ensure_future(compiler.compile(blocker))  # occupies the one worker
        leaving = asyncio.ensure_future(compiler.compile(spec))
        staying = asyncio.ensure_future(compiler.compile(spec))
        await asyncio.sleep(0.05)
        leaving.cancel()
        release.set()
        grammar = await staying
        assert (await first) is not None and grammar is compiler.cached(spec)
        assert (await compiler.compile(spec)) is grammar and compiler.num_compiled == 2
        with pytest.raises(asyncio.CancelledError):
            await leaving

    asyncio.run(main())
    compiler.close()


def test_a_compile_that_fails_at_once_never_blocks_the_event_loop(backend: LLGuidanceBackend) -> None:
    """A bad schema fails in about a millisecond, often before the caller has registered the
    pending compile's cleanup; that cleanup must not need the lock the caller still holds (it did:
    the event loop deadlocked, and the server with it, found by the playground's browser tests).
    The race is widest at a compiler's first compile, which starts its thread: each round uses a
    fresh compiler, so many rounds hit the window."""
    bad = StructuredOutput.json_schema({"type": "bogus"})
    done = threading.Event()

    async def main() -> None:
        for _ in range(100):
            compiler = GrammarCompiler(backend)
            with pytest.raises(InvalidStructuredOutput):
                await compiler.compile(bad)
            compiler.close()
        done.set()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over often: the compile's thread gets to finish first
    try:
        loop = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        loop.start()
        loop.join(30)
    finally:
        sys.setswitchinterval(switch)
    assert done.is_set(), "the event loop deadlocked on a failed compile"
