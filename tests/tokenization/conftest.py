"""Shared fixtures: a Mixtral-layout directory with mistral-common's v1 tokenizer, and its oracles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mistral_common
import pytest
import sentencepiece
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from tokenization import PromptEncoder, load_prompt_encoder

MISTRAL_DATA = Path(mistral_common.__file__).parent / "data"
V1_MODEL = MISTRAL_DATA / "tokenizer.model.v1"


def make_mixtral_dir(root: Path) -> Path:
    """An HF-layout Mixtral directory: a plain tokenizer.model (v1) and config.json."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(V1_MODEL, root / "tokenizer.model")
    (root / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    return root


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mixtral_dir(tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="session")
def mixtral_encoder(mixtral_dir: Path) -> PromptEncoder:
    return load_prompt_encoder(mixtral_dir)


@pytest.fixture(scope="session")
def reference_v1() -> MistralTokenizer:
    return MistralTokenizer.v1()


@pytest.fixture(scope="session")
def spm() -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(V1_MODEL))


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tokenization.tiny_hf import SMOLLM2_TEMPLATE, save_checkpoint_tokenizer, train_tokenizer

    special = {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    return save_checkpoint_tokenizer(
        train_tokenizer(), tmp_path_factory.mktemp("smol"), SMOLLM2_TEMPLATE, **special
    )


@pytest.fixture(scope="session")
def mixtral_template_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tokenization.tiny_hf import MIXTRAL_TEMPLATE, save_checkpoint_tokenizer, train_tokenizer

    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<|endoftext|>"}
    out = tmp_path_factory.mktemp("mixtral_template")
    return save_checkpoint_tokenizer(train_tokenizer(), out, MIXTRAL_TEMPLATE, **special)


@pytest.fixture(scope="session")
def bpe_encoder(smol_dir: Path) -> PromptEncoder:
    """The byte-level BPE fixture (GPT-2 style `Ġ`): its decode is lossless for any text."""
    from tokenization.hf_encoder import HFPromptEncoder

    return HFPromptEncoder.from_dir(smol_dir)


def metaspace_tokenizer_from_spm(spm: sentencepiece.SentencePieceProcessor) -> Tokenizer:
    """Mixtral's v1 vocabulary as a Llama-style `tokenizer.json` (Metaspace, byte fallback): same ids
    and pieces; its merges, ordered by piece id, may split a few strings differently."""
    vocab = {spm.id_to_piece(i): i for i in range(spm.get_piece_size())}
    merges = []
    for piece, piece_id in vocab.items():
        if spm.is_control(piece_id) or spm.is_byte(piece_id) or spm.is_unknown(piece_id):
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((piece_id, vocab[left], left, right))
    merges.sort()
    model = models.BPE(
        vocab=vocab,
        merges=[(left, right) for *_, left, right in merges],
        unk_token="<unk>",
        byte_fallback=True,
        fuse_unk=True,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in ("<unk>", "<s>", "</s>")]
    )
    return tokenizer


@pytest.fixture(scope="session")
def metaspace_encoder(spm: sentencepiece.SentencePieceProcessor) -> PromptEncoder:
    """An HF encoder over a Llama-style (Metaspace + byte fallback) conversion of the v1 vocabulary."""
    from tokenization.chat_template import ChatTemplate
    from tokenization.hf_encoder import HFPromptEncoder

    template = ChatTemplate("{{ bos_token }}", {"bos_token": "<s>", "eos_token": "</s>"})
    return HFPromptEncoder(metaspace_tokenizer_from_spm(spm), template, bos_id=1, eos_id=2, stop_ids=(2,))
