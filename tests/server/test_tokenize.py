"""/tokenize and /detokenize: the ids the API routes use; `safe_prompt` as mistral-common encodes it."""

from __future__ import annotations

import httpx
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from tests.server.conftest import MODEL
from tokenization import SAFE_PROMPT
from tokenization.mistral_encoder import load_plain_sentencepiece

MESSAGES = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Italy?"},
]
CONVERSATION = [
    SystemMessage(content="Answer in one word."),
    UserMessage(content="Capital of France?"),
    AssistantMessage(content="Paris"),
    UserMessage(content="And of Italy?"),
]


def post(server, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}", json=body, headers=server.headers() if headers is None else headers
    )


@pytest.fixture(scope="module")
def mistral(hf_dir):
    """mistral-common's v1 tokenizer, loaded from the served checkpoint's tokenizer.model."""
    return load_plain_sentencepiece(hf_dir / "tokenizer.model")


def reference_ids(mistral, messages) -> list[int]:
    return mistral.encode_chat_completion(ChatCompletionRequest(model="mixtral", messages=messages)).tokens


def test_safe_prompt_ids_are_mistral_common_with_the_guardrail_and_match_chat_usage(server, mistral):
    expected = reference_ids(mistral, [SystemMessage(content=SAFE_PROMPT), *CONVERSATION])
    r = post(server, "/tokenize", {"model": MODEL, "messages": MESSAGES, "safe_prompt": True})
    assert r.status_code == 200, r.text
    assert r.json() == {"tokens": expected, "count": len(expected), "max_model_len": 512}
    chat = post(
        server,
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "safe_prompt": True, "max_tokens": 2, "temperature": 0},
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == len(expected)


def test_without_safe_prompt_the_ids_are_the_plain_conversation(server, mistral):
    expected = reference_ids(mistral, CONVERSATION)
    r = post(server, "/tokenize", {"messages": MESSAGES})  # model is optional
    assert r.json()["tokens"] == expected
    chat = post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == len(expected)


def test_text_prompt_and_round_trip(server, mistral):
    text = "Hello world, ça va? 你好"
    plain = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert plain["count"] == len(plain["tokens"]) > 0 and plain["max_model_len"] == 512
    assert plain["tokens"] == mistral.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)
    assert post(server, "/detokenize", {"model": MODEL, "tokens": plain["tokens"]}).json() == {"prompt": text}
    with_bos = post(server, "/tokenize", {"model": MODEL, "prompt": text}).json()["tokens"]
    assert with_bos == [mistral.instruct_tokenizer.tokenizer.bos_id, *plain["tokens"]]
    assert post(server, "/detokenize", {"tokens": with_bos}).json()["prompt"] == text  # <s> dropped
    assert post(server, "/detokenize", {"tokens": []}).json()["prompt"] == ""


def test_an_alias_names_the_same_model(server):
    a = post(server, "/tokenize", {"model": "mistral-small", "prompt": "hi"})
    assert a.status_code == 200 and a.json() == post(server, "/tokenize", {"prompt": "hi"}).json()


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/detokenize", {"tokens": [5, 32000]}, 400),
        ("/detokenize", {"tokens": [-1]}, 400),
        ("/detokenize", {"model": "nope", "tokens": [5]}, 404),
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404),
        ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400),
        ("/tokenize", {"model": MODEL}, 400),
        ("/tokenize", {"messages": MESSAGES[:3]}, 400),  # ends with an assistant message
        ("/tokenize", {"messages": []}, 400),
    ],
)
def test_refusals(server, path, body, status):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_out_of_range_ids_are_named(server):
    r = post(server, "/detokenize", {"tokens": [5, 10**9]})
    assert r.json()["error"]["param"] == "tokens" and "outside the vocabulary" in r.json()["error"]["message"]


def test_both_need_the_key(server):
    assert post(server, "/tokenize", {"prompt": "x"}, headers={}).status_code == 401
    assert post(server, "/detokenize", {"tokens": [5]}, headers={}).status_code == 401
