"""Shared fixtures: a Mixtral-layout directory with mistral-common's v1 tokenizer, and its oracles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mistral_common
import pytest
import sentencepiece
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

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
