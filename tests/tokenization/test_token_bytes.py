"""`token_bytes`: the exact bytes each token adds to the text (OpenAI logprobs' `bytes` field)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sentencepiece
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from tests.tokenization.conftest import V1_MODEL
from tokenization import PromptEncoder
from tokenization.hf_encoder import HFPromptEncoder, bytes_to_unicode
from tokenization.mistral_encoder import MistralPromptEncoder

SENTENCES = [
    "Hello, world! Plain ASCII with digits 12345 and punctuation.",
    "Héllo wörld: naïve café, Ångström, Straße.",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Emoji 🦜🦩 😀 👩‍👩‍👧 🇫🇷 and ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Mixed: The café in 東京 serves ☕ and 🍣 daily.\n\tIndented  double  spaces ",
    " One leading space, and a trailing one ",
]
FIRST_BYTE_TOKEN = 3  # v1: <0x00> .. <0xFF> are ids 3 .. 258
V1_SPECIALS = {0: b"<unk>", 1: b"<s>", 2: b"</s>"}


def joined(encoder: PromptEncoder, ids: list[int]) -> bytes:
    return b"".join(encoder.token_bytes(i) for i in ids)


def lone_bytes(encoder: PromptEncoder, ids: list[int]) -> list[bytes]:
    """The tokens that are a piece of a character, not valid UTF-8 on their own."""
    pieces = [encoder.token_bytes(i) for i in ids]
    return [p for p in pieces if not is_utf8(p)]


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- SentencePiece: Mixtral's v1 through mistral-common, and the same vocabulary as an HF Metaspace file ---


@pytest.fixture(params=["mistral", "hf-metaspace"])
def sentencepiece_encoder(request: pytest.FixtureRequest) -> PromptEncoder:
    return request.getfixturevalue("mixtral_encoder" if request.param == "mistral" else "metaspace_encoder")


def test_mixtral_encoder_is_mistral_common(mixtral_encoder: PromptEncoder) -> None:
    assert isinstance(mixtral_encoder, MistralPromptEncoder)


@pytest.mark.parametrize("text", SENTENCES)
def test_sentencepiece_bytes_spell_the_text_after_one_leading_space(
    sentencepiece_encoder: PromptEncoder, text: str
) -> None:
    ids = sentencepiece_encoder.encode_text(text, bos=False)
    assert sentencepiece_encoder.decode(ids) == text
    # SentencePiece prepends exactly one space (`▁`) to the text; decode drops it, token_bytes cannot.
    data = joined(sentencepiece_encoder, ids)
    assert data[:1] == b" "
    assert data[1:] == text.encode("utf-8")


def test_sentencepiece_text_really_uses_byte_fallback(sentencepiece_encoder: PromptEncoder) -> None:
    ids = sentencepiece_encoder.encode_text(SENTENCES[3], bos=False)
    pieces = lone_bytes(sentencepiece_encoder, ids)
    assert len(pieces) >= 8
    assert all(len(p) == 1 and p[0] >= 0x80 for p in pieces)


def test_v1_byte_fallback_ids_are_single_bytes(
    mixtral_encoder: PromptEncoder, spm: sentencepiece.SentencePieceProcessor
) -> None:
    for byte in range(256):
        token_id = FIRST_BYTE_TOKEN + byte
        assert spm.id_to_piece(token_id) == f"<0x{byte:02X}>"
        assert spm.is_byte(token_id)
        assert mixtral_encoder.token_bytes(token_id) == bytes([byte])


def test_v1_special_tokens_are_their_text(mixtral_encoder: PromptEncoder) -> None:
    assert mixtral_encoder.bos_id == 1 and mixtral_encoder.eos_id == 2
    for token_id, text in V1_SPECIALS.items():
        assert mixtral_encoder.token_bytes(token_id) == text


def test_v1_every_token_against_sentencepiece(
    mixtral_encoder: PromptEncoder, spm: sentencepiece.SentencePieceProcessor
) -> None:
    """Each ordinary token's bytes are what SentencePiece's decode adds after a word."""
    anchor = spm.piece_to_id("a")
    for token_id in range(spm.get_piece_size()):
        if spm.is_control(token_id) or spm.is_byte(token_id) or spm.is_unknown(token_id):
            continue
        expected = spm.decode([anchor, token_id])[1:].encode("utf-8")
        assert mixtral_encoder.token_bytes(token_id) == expected, (token_id, spm.id_to_piece(token_id))


def test_hf_metaspace_matches_mistral_common_on_every_id(
    mixtral_encoder: PromptEncoder, metaspace_encoder: PromptEncoder
) -> None:
    assert metaspace_encoder.vocab_size == mixtral_encoder.vocab_size == 32000
    for token_id in range(mixtral_encoder.vocab_size):
        assert metaspace_encoder.token_bytes(token_id) == mixtral_encoder.token_bytes(token_id), token_id


def test_tekken_bytes_spell_the_text() -> None:
    """A tekken (byte-level) mistral-common tokenizer: no leading space is added."""
    encoder = MistralPromptEncoder(MistralTokenizer.v3(is_tekken=True))
    for text in SENTENCES:
        ids = encoder.encode_text(text, bos=False)
        assert joined(encoder, ids) == text.encode("utf-8")
    assert lone_bytes(encoder, encoder.encode_text(SENTENCES[3], bos=False))
    assert encoder.token_bytes(encoder.bos_id) == b"<s>"
    assert encoder.token_bytes(encoder.eos_id) == b"</s>"


# --- byte-level BPE (GPT-2 style `Ġ`) ----------------------------------------------------------


@pytest.mark.parametrize("text", SENTENCES)
def test_byte_level_bytes_spell_the_text(bpe_encoder: PromptEncoder, text: str) -> None:
    ids = bpe_encoder.encode_text(text, bos=False)
    assert bpe_encoder.decode(ids) == text
    assert joined(bpe_encoder, ids) == text.encode("utf-8")


def test_byte_level_text_really_splits_characters(bpe_encoder: PromptEncoder) -> None:
    assert lone_bytes(bpe_encoder, bpe_encoder.encode_text(SENTENCES[3], bos=False))


def test_byte_level_single_byte_tokens(bpe_encoder: PromptEncoder, smol_dir: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(smol_dir / "tokenizer.json"))
    for byte, char in bytes_to_unicode().items():
        token_id = tokenizer.token_to_id(char)
        assert token_id is not None
        assert bpe_encoder.token_bytes(token_id) == bytes([byte])


def test_byte_level_every_token_against_decode(bpe_encoder: PromptEncoder, smol_dir: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(smol_dir / "tokenizer.json"))
    specials = set(tokenizer.get_added_tokens_decoder())
    for token_id in range(bpe_encoder.vocab_size):
        data = bpe_encoder.token_bytes(token_id)
        if token_id in specials:
            assert data == tokenizer.id_to_token(token_id).encode()
        elif is_utf8(data):
            assert data.decode() == tokenizer.decode([token_id])


def test_byte_level_special_tokens_are_their_text(bpe_encoder: PromptEncoder) -> None:
    assert bpe_encoder.token_bytes(bpe_encoder.eos_id) == b"<|endoftext|>"
    assert bpe_encoder.bos_id is not None
    assert bpe_encoder.token_bytes(bpe_encoder.bos_id) == b"<|im_start|>"
    im_end = bpe_encoder.encode_text("<|im_end|>", bos=False)
    assert len(im_end) == 1
    assert bpe_encoder.token_bytes(im_end[0]) == b"<|im_end|>"


# --- every encoder ---------------------------------------------------------------------------


@pytest.fixture(params=["mistral", "hf-metaspace", "bpe"])
def any_encoder(request: pytest.FixtureRequest) -> PromptEncoder:
    names = {"mistral": "mixtral_encoder", "hf-metaspace": "metaspace_encoder", "bpe": "bpe_encoder"}
    return request.getfixturevalue(names[request.param])


def test_unknown_ids_give_no_bytes(any_encoder: PromptEncoder) -> None:
    assert any_encoder.token_bytes(any_encoder.vocab_size) == b""
    assert any_encoder.token_bytes(any_encoder.vocab_size + 1000) == b""
    assert any_encoder.token_bytes(-1) == b""


def test_whole_vocabulary_is_fast(smol_dir: Path) -> None:
    """Fresh encoders: the first pass over the vocabulary computes, the second is dictionary lookups."""
    for encoder in (MistralPromptEncoder.from_file(V1_MODEL), HFPromptEncoder.from_dir(smol_dir)):
        ids = range(encoder.vocab_size)
        start = time.perf_counter()
        first = [encoder.token_bytes(i) for i in ids]
        cold = time.perf_counter() - start
        start = time.perf_counter()
        again = [encoder.token_bytes(i) for i in ids]
        warm = time.perf_counter() - start
        assert first == again
        assert cold < 1.0 and warm < 0.1, (cold, warm)
