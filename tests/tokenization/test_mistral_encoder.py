"""The v1 (Mixtral 8x7B) prompt encoder against mistral-common and a raw SentencePiece rendering."""

from __future__ import annotations

from typing import Any

import pytest
import sentencepiece
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from tests.tokenization.mistral_cases import CASES, Case, Turn
from tokenization import (
    ChatMessage,
    InvalidConversationError,
    PromptEncoder,
    parse_messages,
    with_safe_prompt,
)
from tokenization.mistral_encoder import MistralPromptEncoder

BOS, EOS = 1, 2
INST_OPEN_SPACE_BRACKET = 733  # "▁[": what mistral-common puts before INST
BARE_BRACKET = 28792  # "[": the pitfall of converted fast tokenizers


def encode_body(encoder: PromptEncoder, body: dict[str, Any]) -> list[int]:
    messages = parse_messages(body["messages"])
    if body.get("safe_prompt"):
        messages = with_safe_prompt(messages)
    return encoder.encode_chat(messages)


def render_v1(spm: sentencepiece.SentencePieceProcessor, turns: list[Turn]) -> list[int]:
    """Mixtral's v1 prompt from turns, with nothing but SentencePiece."""
    ids = [spm.bos_id()]
    for kind, text in turns:
        if kind == "inst":
            ids += spm.encode(f"[INST] {text} [/INST]")
        else:
            ids += spm.encode(text) + ([spm.eos_id()] if kind == "ans" else [])
    return ids


def test_enough_cases() -> None:
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)


def test_documented_example(mixtral_encoder: PromptEncoder) -> None:
    body = {"messages": [{"role": "system", "content": "Be nice"}, {"role": "user", "content": "Hi"}]}
    body["messages"] += [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]
    ids = encode_body(mixtral_encoder, body)
    assert ids[:15] == [1, 733, 16289, 28793, 1739, 5171, 13, 13, 23809, 733, 28748, 16289, 28793, 22557, 2]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_matches_mistral_common(
    case: Case, mixtral_encoder: PromptEncoder, reference_v1: MistralTokenizer
) -> None:
    expected = reference_v1.encode_chat_completion(
        ChatCompletionRequest(messages=case.mistral_messages)
    ).tokens
    assert encode_body(mixtral_encoder, case.body) == expected


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_matches_sentencepiece_rendering(
    case: Case, mixtral_encoder: PromptEncoder, spm: sentencepiece.SentencePieceProcessor
) -> None:
    ids = encode_body(mixtral_encoder, case.body)
    assert ids == render_v1(spm, case.turns)
    assert ids[0] == BOS and ids[1] == INST_OPEN_SPACE_BRACKET and ids[1] != BARE_BRACKET
    assert ids.count(BOS) == 1


def test_prefix_leaves_answer_open(mixtral_encoder: PromptEncoder) -> None:
    closed = encode_body(mixtral_encoder, {"messages": [{"role": "user", "content": "q"}]})
    body = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "So", "prefix": True}]
    }
    opened = encode_body(mixtral_encoder, body)
    assert opened[: len(closed)] == closed
    assert opened[-1] != EOS and mixtral_encoder.decode(opened[len(closed) :]) == "So"


def test_every_inst_opens_with_space_bracket(mixtral_encoder: PromptEncoder) -> None:
    body = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    body["messages"].append({"role": "user", "content": "c"})
    ids = encode_body(mixtral_encoder, body)
    assert BARE_BRACKET not in ids
    assert ids.count(INST_OPEN_SPACE_BRACKET) == 4  # two "[INST]" and two "[/INST]"


def test_encoder_properties(mixtral_encoder: PromptEncoder) -> None:
    assert isinstance(mixtral_encoder, MistralPromptEncoder)
    assert mixtral_encoder.version == TokenizerVersion.v1
    assert (mixtral_encoder.bos_id, mixtral_encoder.eos_id, mixtral_encoder.stop_token_ids) == (
        BOS,
        EOS,
        (EOS,),
    )
    assert mixtral_encoder.vocab_size == 32000
    assert mixtral_encoder.supports_tools is False


def test_encode_text_and_decode(
    mixtral_encoder: PromptEncoder, spm: sentencepiece.SentencePieceProcessor
) -> None:
    assert mixtral_encoder.encode_text("Hello world", bos=True) == [BOS, *spm.encode("Hello world")]
    assert mixtral_encoder.encode_text("Hello world", bos=False) == spm.encode("Hello world")
    ids = mixtral_encoder.encode_text("héllo 🍕 世界", bos=True) + [EOS]
    assert mixtral_encoder.decode(ids) == "héllo 🍕 世界"


@pytest.mark.parametrize(
    ("messages", "index"),
    [
        ([ChatMessage("user", "x"), ChatMessage("assistant", "y")], None),
        ([ChatMessage("user", "x"), ChatMessage("assistant", "", prefix=True)], None),
        # v1 has no tool tokens: refused before mistral-common, naming the message
        ([ChatMessage("user", "x"), ChatMessage("tool", "result", tool_call_id="abc123xyz")], 1),
    ],
    ids=["last_assistant", "empty_prefix", "tool_without_call"],
)
def test_mistral_common_refusals_are_typed(
    mixtral_encoder: PromptEncoder, messages: list[ChatMessage], index: int | None
) -> None:
    with pytest.raises(InvalidConversationError) as caught:
        mixtral_encoder.encode_chat(messages)
    assert caught.value.index == index and caught.value.message
