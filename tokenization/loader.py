"""Pick and load the prompt encoder for a model directory.

Mistral checkpoints are encoded with mistral-common (the official encoder); anything else with
HF `tokenizers` plus its chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from mistral_common.tokens.tokenizers.base import TokenizerVersion

from tokenization.errors import TokenizerNotFoundError
from tokenization.hf_encoder import (
    TOKENIZER_CONFIG_JSON,
    TOKENIZER_JSON,
    HFPromptEncoder,
    load_template_source,
    read_json,
)
from tokenization.mistral_encoder import PLAIN_SENTENCEPIECE_NAME, MistralPromptEncoder
from tokenization.prompt_encoder import PromptEncoder

TEKKEN_JSON = "tekken.json"
VERSIONED_SENTENCEPIECE_GLOB = "*.model.v*"
PARAMS_JSON = "params.json"
CONFIG_JSON = "config.json"
MISTRAL_MODEL_TYPES = frozenset({"mistral", "mixtral"})

# "auto" chooses by the files present; "mistral" / "hf" force one encoder (as vLLM's --tokenizer-mode).
TokenizerMode = Literal["auto", "mistral", "hf"]


def find_mistral_tokenizer_file(model_dir: Path, assume_mistral: bool = False) -> Path | None:
    """The mistral-common tokenizer file of `model_dir`, or None when it is not a Mistral layout.

    In order: `tekken.json`; one `*.model.vN` file; a plain `tokenizer.model` when the directory has
    a `params.json` (Mistral's consolidated layout), config.json says `mistral`/`mixtral`, or
    `assume_mistral` is set.
    """
    tekken = model_dir / TEKKEN_JSON
    if tekken.is_file():
        return tekken
    versioned = sorted(model_dir.glob(VERSIONED_SENTENCEPIECE_GLOB))
    if len(versioned) > 1:
        names = ", ".join(path.name for path in versioned)
        raise TokenizerNotFoundError(f"{model_dir} has several versioned tokenizer files: {names}")
    if versioned:
        return versioned[0]
    plain = model_dir / PLAIN_SENTENCEPIECE_NAME
    if plain.is_file() and (assume_mistral or _is_mistral_layout(model_dir)):
        return plain
    return None


def _is_mistral_layout(model_dir: Path) -> bool:
    if (model_dir / PARAMS_JSON).is_file():
        return True
    return read_json(model_dir / CONFIG_JSON).get("model_type") in MISTRAL_MODEL_TYPES


def _fine_tuned_template(
    model_dir: Path, path: Path, encoder: MistralPromptEncoder, has_hf_tokenizer: bool
) -> bool:
    """A plain v2/v3 `tokenizer.model` beside a `tokenizer.json` whose chat template is not
    Mistral's (no `[INST]`): a fine-tune with its own format (ChatML), encoded by its template."""
    plain = path.name == PLAIN_SENTENCEPIECE_NAME
    if not plain or not has_hf_tokenizer or encoder.version == TokenizerVersion.v1:
        return False
    try:
        source = load_template_source(model_dir, read_json(model_dir / TOKENIZER_CONFIG_JSON))
    except TokenizerNotFoundError:
        return False
    return "[INST]" not in source


def load_prompt_encoder(model_dir: str | Path, mode: TokenizerMode = "auto") -> PromptEncoder:
    """Load the prompt encoder for `model_dir`.

    A plain `tokenizer.model` is read as the Mistral version its model is (v1, v2 or v3). With
    `mode="auto"`, a v2/v3 one beside a `tokenizer.json` whose chat template is not Mistral's
    (e.g. a ChatML fine-tune of Mistral 7B v0.3) is encoded by that template instead.

    Raises:
        TokenizerNotFoundError: when the directory holds no usable tokenizer.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TokenizerNotFoundError(f"{model_dir} is not a directory")
    if mode == "hf":
        return HFPromptEncoder.from_dir(model_dir)
    has_hf_tokenizer = (model_dir / TOKENIZER_JSON).is_file()
    path = find_mistral_tokenizer_file(model_dir, assume_mistral=mode == "mistral")
    if path is not None:
        try:
            encoder = MistralPromptEncoder.from_file(path)
        except TokenizerNotFoundError:
            if mode == "mistral" or not has_hf_tokenizer:
                raise
        else:
            if mode == "mistral" or not _fine_tuned_template(model_dir, path, encoder, has_hf_tokenizer):
                return encoder
    elif mode == "mistral":
        raise TokenizerNotFoundError(
            f"{model_dir} has no mistral-common tokenizer (tekken.json, tokenizer.model*)"
        )
    if has_hf_tokenizer:
        return HFPromptEncoder.from_dir(model_dir)
    raise TokenizerNotFoundError(
        f"{model_dir} has no tokenizer: expected tekken.json, tokenizer.model(.vN) or tokenizer.json"
    )
