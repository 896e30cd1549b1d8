"""The HF-tokenizers + chat-template encoder against transformers' apply_chat_template."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tests.tokenization.tiny_hf import move_template_into_config
from tokenization import InvalidConversationError, PromptEncoder, load_prompt_encoder, parse_messages
from tokenization.chat_template import ChatTemplate
from tokenization.hf_encoder import HFPromptEncoder

Messages = list[dict[str, Any]]


def u(content: str) -> dict[str, Any]:
    return {"role": "user", "content": content}


def a(content: str) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def s(content: str) -> dict[str, Any]:
    return {"role": "system", "content": content}


def input_ids(result: Any) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)."""
    return list(result["input_ids"] if hasattr(result, "keys") else result)


def reference_ids(
    reference: PreTrainedTokenizerBase, messages: Messages, continue_final: bool = False
) -> list[int]:
    result = reference.apply_chat_template(
        messages,
        tokenize=True,
        add_generation_prompt=not continue_final,
        continue_final_message=continue_final,
    )
    return input_ids(result)


@pytest.fixture(scope="module")
def smol(smol_dir: Path) -> PromptEncoder:
    return load_prompt_encoder(smol_dir)


@pytest.fixture(scope="module")
def smol_reference(smol_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="module")
def mixtral_template(mixtral_template_dir: Path) -> PromptEncoder:
    return load_prompt_encoder(mixtral_template_dir)


@pytest.fixture(scope="module")
def mixtral_template_reference(mixtral_template_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(mixtral_template_dir)


CHATS: dict[str, Messages] = {
    "user": [u("Hello")],
    "system": [s("You are terse."), u("Hi")],
    "multi_turn": [u("Hi"), a("Hello! How are you?"), u("Fine.")],
    "few_shot": [s("Translate."), u("cat"), a("chat"), u("dog"), a("chien"), u("bird")],
    "non_ascii": [u("日本語のテキスト 😀"), a("Привет 🍕"), u("한국어")],
    "newlines": [u("line1\nline2\n\n"), a("ok\n"), u("\n")],
    "near_empty": [u(" "), a("a"), u("")],
}
PREFIX_CHATS: dict[str, Messages] = {
    "prefix": [u("Write a story"), a("Once upon")],
    "prefix_trailing_space": [s("Be kind."), u("Q"), a("A"), u("Q2"), a("Sure, ")],
    "prefix_trailing_newline": [u("List"), a("1. one\n")],
}


@pytest.mark.parametrize("messages", list(CHATS.values()), ids=list(CHATS))
def test_generation_prompt_matches_transformers(
    smol: PromptEncoder, smol_reference: PreTrainedTokenizerBase, messages: Messages
) -> None:
    assert smol.encode_chat(parse_messages(messages)) == reference_ids(smol_reference, messages)


@pytest.mark.parametrize("messages", list(PREFIX_CHATS.values()), ids=list(PREFIX_CHATS))
def test_prefix_matches_continue_final_message(
    smol: PromptEncoder, smol_reference: PreTrainedTokenizerBase, messages: Messages
) -> None:
    raw = [*messages[:-1], {**messages[-1], "prefix": True}]
    assert smol.encode_chat(parse_messages(raw)) == reference_ids(
        smol_reference, messages, continue_final=True
    )


def test_consecutive_users_and_systems_are_joined(
    smol: PromptEncoder, smol_reference: PreTrainedTokenizerBase
) -> None:
    raw = [s("A"), s("B"), u("one"), u("two"), a("x"), a("y"), u("three")]
    merged = [s("A\n\nB"), u("one\n\ntwo"), a("x\n\ny"), u("three")]
    assert smol.encode_chat(parse_messages(raw)) == reference_ids(smol_reference, merged)


def test_template_in_tokenizer_config(
    smol_dir: Path, tmp_path: Path, smol_reference: PreTrainedTokenizerBase
) -> None:
    legacy = move_template_into_config(Path(shutil.copytree(smol_dir, tmp_path / "legacy")))
    encoder = load_prompt_encoder(legacy)
    messages = CHATS["few_shot"]
    assert encoder.encode_chat(parse_messages(messages)) == reference_ids(smol_reference, messages)


def test_mixtral_template_uses_bos_and_eos(
    mixtral_template: PromptEncoder, mixtral_template_reference: PreTrainedTokenizerBase
) -> None:
    messages = [u("Hi"), a("Hello"), u("Again")]
    ids = mixtral_template.encode_chat(parse_messages(messages))
    assert ids == reference_ids(mixtral_template_reference, messages)
    assert ids[0] == mixtral_template.bos_id and mixtral_template.eos_id in ids
    prefixed = [u("Hi"), {**a("Hel"), "prefix": True}]
    expected = reference_ids(mixtral_template_reference, [u("Hi"), a("Hel")], continue_final=True)
    assert mixtral_template.encode_chat(parse_messages(prefixed)) == expected
    assert expected[-1] != mixtral_template.eos_id


def test_merging_satisfies_alternating_templates(
    mixtral_template: PromptEncoder, mixtral_template_reference: PreTrainedTokenizerBase
) -> None:
    ids = mixtral_template.encode_chat(parse_messages([u("a"), u("b")]))
    assert ids == reference_ids(mixtral_template_reference, [u("a\n\nb")])


def test_template_refusal_is_invalid_conversation(mixtral_template: PromptEncoder) -> None:
    with pytest.raises(
        InvalidConversationError,
        match="chat template refused the conversation: Conversation roles must alternate",
    ):
        mixtral_template.encode_chat(parse_messages([s("sys"), u("Hi")]))


def test_properties(smol: PromptEncoder, smol_reference: PreTrainedTokenizerBase) -> None:
    assert isinstance(smol, HFPromptEncoder)
    vocab = smol_reference.get_vocab()
    assert smol.bos_id == vocab["<|im_start|>"]
    assert smol.eos_id == vocab["<|endoftext|>"]
    assert smol.stop_token_ids == (vocab["<|endoftext|>"], vocab["<|im_end|>"])
    assert smol.vocab_size == len(vocab)
    assert smol.supports_tools is False


def test_generation_config_eos_ids_stop(smol_dir: Path, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(smol_dir, tmp_path / "gen"))
    (directory / "generation_config.json").write_text('{"eos_token_id": [0, 4]}')
    assert load_prompt_encoder(directory).stop_token_ids == (0, 4, 2)


def test_encode_text_and_decode(smol: PromptEncoder, smol_reference: PreTrainedTokenizerBase) -> None:
    text = "Hello 😀 世界\n"
    plain = smol_reference.encode(text, add_special_tokens=False)
    assert smol.encode_text(text, bos=False) == plain
    assert smol.encode_text(text, bos=True) == [smol.bos_id, *plain]
    assert smol.decode([smol.bos_id, *plain, smol.eos_id]) == text


def test_template_helpers() -> None:
    template = ChatTemplate("{{ strftime_now('%Y') }} {{ messages | tojson }}", {})
    rendered = template.render([u("<é>")])
    assert rendered == f'{datetime.datetime.now().year} [{{"role": "user", "content": "<é>"}}]'
    with pytest.raises(InvalidConversationError, match="nope"):
        ChatTemplate("{{ raise_exception('nope') }}", {}).render([u("x")])


def test_template_sandbox_blocks_attribute_escape() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__ }}", {})
    with pytest.raises(InvalidConversationError):
        template.render([u("x")])


turn_texts = st.one_of(
    st.sampled_from(["a", " ", "x \n", "\n\nend ", "日本 😀"]), st.text(min_size=1, max_size=10)
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(turn_texts, min_size=1, max_size=5), system=st.one_of(st.none(), turn_texts))
def test_random_chats_match_transformers(
    smol: PromptEncoder, smol_reference: PreTrainedTokenizerBase, turns: list[str], system: str | None
) -> None:
    messages = ([s(system)] if system is not None else []) + [
        (u if index % 2 == 0 else a)(text) for index, text in enumerate(turns)
    ]
    prefix = messages[-1]["role"] == "assistant"
    raw = [*messages[:-1], {**messages[-1], "prefix": True}] if prefix else messages
    assert smol.encode_chat(parse_messages(raw)) == reference_ids(
        smol_reference, messages, continue_final=prefix
    )
