"""`response_format` over HTTP, against a real server on the tiny random v1 checkpoint.

The weights are random, so only the grammar makes a reply valid. Checked: both SDKs' shapes,
streamed and not, `n > 1`, `prefix`; the real clients' structured-output helpers (`openai`
`chat.completions.parse`, `mistralai` `chat.parse`, LangChain's `with_structured_output` with
the json_schema method on `ChatOpenAI` and `ChatMistralAI`), each on one keep-alive connection;
Mistral's prompt rule against mistral-common's own encoding; and each bad `response_format` a
400 naming its field, on a connection that stays usable.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Annotated

import httpx
import jsonschema
import openai
import pytest
from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MistralRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from pydantic import BaseModel, Field, StringConstraints

from server.protocol import ChatCompletionRequest
from server.response_format import parse_response_format
from server.routes.chat import encode
from tests.server.conftest import API_KEY, MODEL
from tests.structured.schemas import SCHEMAS, UNSUPPORTED
from tests.tokenization.conftest import V1_MODEL
from tokenization import SAFE_PROMPT
from tokenization.mistral_encoder import MistralPromptEncoder, load_plain_sentencepiece
from tokenization.schema_prompt import schema_instruction

MESSAGES = [{"role": "user", "content": "Extract: I read 'Dune' by Frank Herbert, published in 1965."}]
MAX_TOKENS = 200

Name = Annotated[str, StringConstraints(max_length=10)]


class Book(BaseModel):
    """What the SDKs' helpers turn into a strict JSON schema (every string and list bounded)."""

    name: Name
    authors: list[Name] = Field(max_length=2)
    year: int = Field(ge=1000, le=2100)


def json_schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as client:
        yield client


def chat(http: httpx.Client, response_format: dict | None, **kw) -> httpx.Response:
    body = {"model": MODEL, "messages": kw.pop("messages", MESSAGES), "max_tokens": MAX_TOKENS}
    return http.post("/v1/chat/completions", json=body | {"response_format": response_format} | kw)


@pytest.mark.parametrize(
    "name", ["flat_record", "nested_object", "object_array", "any_of_objects", "one_of_tagged"]
)
def test_json_schema_replies_validate_streamed_or_not(http, name) -> None:
    schema = SCHEMAS[name]
    r = chat(http, json_schema_format(schema), temperature=0)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    text, done = "", False
    with http.stream("POST", "/v1/chat/completions", json={
        "model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
        "response_format": json_schema_format(schema),
    }) as stream:  # fmt: skip
        for line in stream.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    assert done and text == choice["message"]["content"]


def test_json_object_and_sampled_n4_replies_are_json(http) -> None:
    person = {"type": "json_schema", "json_schema": {"name": "b", "schema": SCHEMAS["pydantic_person"]}}
    r = chat(http, person, temperature=1.0, n=4, seed=3, max_tokens=150)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 4
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMAS["pydantic_person"])
    r = chat(http, {"type": "json_object"}, temperature=0, max_tokens=24)
    content = r.json()["choices"][0]["message"]["content"]
    assert r.status_code == 200 and content.startswith("{")  # a random model's object may not end in 24
    assert chat(http, {"type": "text"}, max_tokens=4).status_code == 200


def test_a_prefix_is_part_of_the_instance(http) -> None:
    prefix = '{"name":"Dune"'
    messages = [*MESSAGES, {"role": "assistant", "content": prefix, "prefix": True}]
    r = chat(http, json_schema_format(SCHEMAS["flat_record"]), messages=messages, temperature=0)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert content.startswith(prefix)
    jsonschema.validate(json.loads(content), SCHEMAS["flat_record"])
    broken = [*MESSAGES, {"role": "assistant", "content": '{"age":', "prefix": True}]
    r = chat(http, json_schema_format(SCHEMAS["flat_record"]), messages=broken)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


SCHEMA = "response_format.json_schema.schema"
WIDE = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(7000)}}
BAD_FORMATS = {
    "unknown-type": ({"type": "xml"}, "response_format.type", "one of text, json_object, json_schema"),
    "no-type": ({"json_schema": {}}, "response_format.type", "got None"),
    "not-an-object": ("json", "response_format", "valid dictionary"),
    "no-json-schema": ({"type": "json_schema"}, "response_format.json_schema", "name and a schema"),
    "no-schema": ({"type": "json_schema", "json_schema": {"name": "x"}}, SCHEMA, "JSON schema"),
    "bad-name": (
        {"type": "json_schema", "json_schema": {"name": 3, "schema": {}}},
        "response_format.json_schema.name",
        "str",
    ),
    "invalid-schema": (json_schema_format({"type": "foo"}), SCHEMA, "Invalid type: foo"),
    "unsupported-keyword": (json_schema_format(UNSUPPORTED["not"]), SCHEMA, '["not"]'),
    "oversized": (json_schema_format(WIDE), SCHEMA, "bytes as JSON; at most 65536"),
    "engine-options": (json_schema_format({"x-guidance": {"lenient": True}}), SCHEMA, "x-guidance"),
}


@pytest.mark.parametrize(("response_format", "param", "says"), BAD_FORMATS.values(), ids=BAD_FORMATS.keys())
def test_bad_response_formats_get_a_400_naming_the_field(http, response_format, param, says) -> None:
    r = chat(http, response_format)
    # A field of the wrong JSON type is request validation's 422, as for every other field.
    assert r.status_code == (400 if isinstance(response_format, dict) else 422), r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert chat(http, None, max_tokens=2).status_code == 200  # the same connection serves on


def test_completions_refuse_a_response_format(http) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "response_format": {"type": "json_object"}}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    assert http.post("/v1/completions", json=body | {"response_format": {"type": "text"}}).status_code == 200


def reference_ids(tokenizer: MistralTokenizer, system: str, user: str) -> list[int]:
    request = MistralRequest(messages=[SystemMessage(content=system), UserMessage(content=user)], model="m")
    return tokenizer.encode_chat_completion(request).tokens


@pytest.mark.parametrize("safe_prompt", [False, True])
def test_the_schema_is_prepended_to_the_system_prompt_as_mistral_does(safe_prompt) -> None:
    """`Your output should be ... {schema}` joins the client's system prompt with a blank line,
    after the guardrail: the prompt ids equal mistral-common's for that one system prompt."""
    tokenizer = load_plain_sentencepiece(V1_MODEL)
    model = SimpleNamespace(encoder=MistralPromptEncoder(tokenizer))
    schema = {
        "type": "object",
        "title": "Café",
        "properties": {"b": {"type": "integer"}, "a": {"type": "string"}},
    }
    req = ChatCompletionRequest(
        model=MODEL, safe_prompt=safe_prompt, response_format=json_schema_format(schema),
        messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
    )  # fmt: skip
    _, ids = asyncio.run(encode(req, model, parse_response_format(req.response_format)))  # type: ignore[arg-type]
    instruction = schema_instruction(schema)
    assert instruction == (
        "Your output should be an instance of a JSON object following this schema: "
        '{"type": "object", "title": "Café", '
        '"properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}'
    )  # the keys in the order sent, Python's default separators, non-ASCII as is
    system = "\n\n".join([*([SAFE_PROMPT] if safe_prompt else []), instruction, "Be terse."])
    assert ids == reference_ids(tokenizer, system, "Hi")
    free = ChatCompletionRequest(model=MODEL, messages=req.messages, response_format={"type": "json_object"})
    _, plain = asyncio.run(encode(free, model, parse_response_format(free.response_format)))  # type: ignore[arg-type]
    assert plain == reference_ids(tokenizer, "Be terse.", "Hi")  # json_object adds nothing


def test_prompt_tokens_over_http_count_the_instruction(http) -> None:
    schema = SCHEMAS["flat_record"]
    plain = chat(http, None, max_tokens=1).json()["usage"]["prompt_tokens"]
    framed = chat(http, json_schema_format(schema), max_tokens=1).json()["usage"]["prompt_tokens"]
    expected = reference_ids(
        load_plain_sentencepiece(V1_MODEL), schema_instruction(schema), MESSAGES[0]["content"]
    )
    assert framed == len(expected) and framed > plain


# --- real clients, each with one keep-alive connection ---


def check_book(book: Book) -> None:
    assert isinstance(book, Book)
    jsonschema.validate(book.model_dump(), Book.model_json_schema())


def test_openai_parse_gives_the_pydantic_model(server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    for seed in (None, 1, 2):
        sampled = {} if seed is None else {"temperature": 1.0, "seed": seed}
        r = client.chat.completions.parse(
            model=MODEL, messages=MESSAGES, response_format=Book, max_tokens=MAX_TOKENS,
            **({"temperature": 0} | sampled),
        )  # fmt: skip
        check_book(r.choices[0].message.parsed)


def test_mistralai_parse_gives_the_pydantic_model(server) -> None:
    from mistralai.client import Mistral

    client = Mistral(api_key=API_KEY, server_url=server.url, timeout_ms=60_000)
    r = client.chat.parse(
        model=MODEL, messages=MESSAGES, response_format=Book, max_tokens=MAX_TOKENS, temperature=0
    )
    check_book(r.choices[0].message.parsed)


def test_langchain_with_structured_output_json_schema(server) -> None:
    from langchain_mistralai import ChatMistralAI
    from langchain_openai import ChatOpenAI

    for chat_model in (
        ChatOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, model=MODEL, temperature=0,
                   max_tokens=MAX_TOKENS, max_retries=0),
        ChatMistralAI(endpoint=f"{server.url}/v1", api_key=API_KEY, model=MODEL, temperature=0,
                      max_tokens=MAX_TOKENS, max_retries=0),
    ):  # fmt: skip
        check_book(
            chat_model.with_structured_output(Book, method="json_schema").invoke(MESSAGES[0]["content"])
        )
