"""The real `openai` client against the real server process."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import API_KEY, MODEL


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert (
        r.usage.completion_tokens <= 8
        and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    )


def test_stream_equals_non_stream_and_usage_chunk(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_stop_and_seed(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, n=3, temperature=1.0, seed=5
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    again = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, n=3, temperature=1.0, seed=5
    )
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    greedy = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    text = greedy.choices[0].message.content
    stop = text[4:7]
    cut = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_errors_map_to_openai_exceptions(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100_000)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices


def test_models_and_aliases(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL, "open-mixtral-8x7b", "mistral-small"]
    assert client.models.retrieve("mistral-small").id == "mistral-small"
    r = client.chat.completions.create(model="open-mixtral-8x7b", messages=MESSAGES, max_tokens=2)
    assert r.model == "open-mixtral-8x7b"
