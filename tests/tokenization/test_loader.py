"""load_prompt_encoder: which encoder a model directory gets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mistral_common.tokens.tokenizers.base import TokenizerVersion

from tests.tokenization.conftest import MISTRAL_DATA, V1_MODEL, make_mixtral_dir
from tokenization import TokenizerNotFoundError, load_prompt_encoder, parse_messages
from tokenization.hf_encoder import HFPromptEncoder
from tokenization.mistral_encoder import MistralPromptEncoder

V3_MODEL = MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3"
TEKKEN = MISTRAL_DATA / "tekken_240911.json"


def mistral_version(directory: Path) -> TokenizerVersion:
    encoder = load_prompt_encoder(directory)
    assert isinstance(encoder, MistralPromptEncoder)
    return encoder.version


def test_hf_layout_mixtral_is_v1(tmp_path: Path) -> None:
    assert mistral_version(make_mixtral_dir(tmp_path)) == TokenizerVersion.v1


def test_consolidated_layout_is_v1(tmp_path: Path) -> None:
    shutil.copyfile(V1_MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 4096, "moe": {"num_experts": 8}}))
    assert mistral_version(tmp_path) == TokenizerVersion.v1


def test_versioned_sentencepiece(tmp_path: Path) -> None:
    shutil.copyfile(V3_MODEL, tmp_path / "tokenizer.model.v3")
    shutil.copyfile(V3_MODEL, tmp_path / "tokenizer.model")
    encoder = load_prompt_encoder(tmp_path)
    assert isinstance(encoder, MistralPromptEncoder)
    assert encoder.version == TokenizerVersion.v3 and encoder.supports_tools is True
    ids = encoder.encode_chat(parse_messages([{"role": "user", "content": "Hi"}]))
    assert ids[:2] == [encoder.bos_id, 3]  # v3's [INST] is a control token


def test_tekken(tmp_path: Path) -> None:
    (tmp_path / "tekken.json").symlink_to(TEKKEN)
    encoder = load_prompt_encoder(tmp_path)
    assert isinstance(encoder, MistralPromptEncoder) and encoder.supports_tools is True
    assert encoder.vocab_size == 131072


def test_a_plain_v3_file_is_read_as_v3_from_the_model_itself(tmp_path: Path) -> None:
    """Published checkpoints (Mistral 7B Instruct v0.3) ship v3 as a plain `tokenizer.model`."""
    shutil.copyfile(V3_MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    encoder = load_prompt_encoder(tmp_path)
    assert isinstance(encoder, MistralPromptEncoder) and encoder.version == TokenizerVersion.v3
    reference = load_prompt_encoder(_versioned(tmp_path / "versioned"))
    messages = parse_messages([{"role": "user", "content": "Hi"}])
    assert encoder.encode_chat(messages) == reference.encode_chat(messages)


def _versioned(directory: Path) -> Path:
    directory.mkdir()
    shutil.copyfile(V3_MODEL, directory / "tokenizer.model.v3")
    return directory


def test_a_plain_v7_file_is_refused_since_only_its_name_tells_its_variant(tmp_path: Path) -> None:
    shutil.copyfile(MISTRAL_DATA / "mistral_instruct_tokenizer_241114.model.v7", tmp_path / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(TokenizerNotFoundError, match="none of Mistral's v1, v2 or v3"):
        load_prompt_encoder(tmp_path)


def test_non_v1_mistral_fine_tune_falls_back_to_template(smol_dir: Path, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(smol_dir, tmp_path / "chatml_mistral"))
    shutil.copyfile(V3_MODEL, directory / "tokenizer.model")
    (directory / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    assert isinstance(load_prompt_encoder(directory), HFPromptEncoder)  # its ChatML template
    forced = load_prompt_encoder(directory, mode="mistral")
    assert isinstance(forced, MistralPromptEncoder) and forced.version == TokenizerVersion.v3


def test_plain_sentencepiece_of_another_family_is_not_mistral(smol_dir: Path, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(smol_dir, tmp_path / "llama"))
    shutil.copyfile(V1_MODEL, directory / "tokenizer.model")
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert isinstance(load_prompt_encoder(directory), HFPromptEncoder)
    assert isinstance(load_prompt_encoder(directory, mode="mistral"), MistralPromptEncoder)


def test_forced_modes(smol_dir: Path) -> None:
    assert isinstance(load_prompt_encoder(smol_dir, mode="hf"), HFPromptEncoder)
    with pytest.raises(TokenizerNotFoundError, match="no mistral-common tokenizer"):
        load_prompt_encoder(smol_dir, mode="mistral")


def test_several_versioned_files_are_ambiguous(tmp_path: Path) -> None:
    shutil.copyfile(V1_MODEL, tmp_path / "tokenizer.model.v1")
    shutil.copyfile(V3_MODEL, tmp_path / "tokenizer.model.v3")
    with pytest.raises(TokenizerNotFoundError, match="several"):
        load_prompt_encoder(tmp_path)


def test_missing_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(TokenizerNotFoundError, match="has no tokenizer"):
        load_prompt_encoder(tmp_path)
    with pytest.raises(TokenizerNotFoundError, match="not a directory"):
        load_prompt_encoder(tmp_path / "absent")
    shutil.copyfile(V1_MODEL, tmp_path / "tokenizer.model")
    with pytest.raises(TokenizerNotFoundError):
        load_prompt_encoder(tmp_path)


def test_hf_dir_without_template(smol_dir: Path, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(smol_dir, tmp_path / "no_template"))
    (directory / "chat_template.jinja").unlink()
    with pytest.raises(TokenizerNotFoundError, match="no chat template"):
        load_prompt_encoder(directory)
