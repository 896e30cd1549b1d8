"""/tokenize and /detokenize; `safe_prompt` ids equal mistral-common's with the guardrail prepended."""

from __future__ import annotations

import httpx
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from tests.server.conftest import MODEL
from tokenization import SAFE_PROMPT
from tokenization.mistral_encoder import load_v1_sentencepiece

BODY_MESSAGES = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Italy?"},
]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=server.headers(), timeout=30)


def test_safe_prompt_ids_equal_mistral_common_and_usage(server, hf_dir):
    tokenizer = load_v1_sentencepiece(hf_dir / "tokenizer.model")
    expected = tokenizer.encode_chat_completion(
        ChatCompletionRequest(
            model="mixtral",
            messages=[
                SystemMessage(content=SAFE_PROMPT),
                SystemMessage(content="Answer in one word."),
                UserMessage(content="Capital of France?"),
                AssistantMessage(content="Paris"),
                UserMessage(content="And of Italy?"),
            ],
        )
    ).tokens
    r = post(server, "/tokenize", {"model": MODEL, "messages": BODY_MESSAGES, "safe_prompt": True})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == expected
    chat = post(
        server,
        "/v1/chat/completions",
        {"model": MODEL, "messages": BODY_MESSAGES, "safe_prompt": True, "max_tokens": 2, "temperature": 0},
    )
    assert chat.json()["usage"]["prompt_tokens"] == len(expected)
    plain = post(server, "/tokenize", {"model": MODEL, "messages": BODY_MESSAGES})
    assert len(plain.json()["tokens"]) < len(expected)


def test_text_round_trip_and_bad_ids(server):
    r = post(server, "/tokenize", {"prompt": "Hello world, ça va?", "add_special_tokens": False})
    ids = r.json()["tokens"]
    assert r.json()["count"] == len(ids) > 0
    assert post(server, "/detokenize", {"tokens": ids}).json()["prompt"] == "Hello world, ça va?"
    bad = post(server, "/detokenize", {"tokens": [5, 10**9]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
    assert post(server, "/tokenize", {"model": "nope", "prompt": "x"}).status_code == 404
