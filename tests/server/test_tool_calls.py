"""Tool calls against a real server on a tiny random v3 checkpoint (Mistral 7B v0.3's tokenizer).

The checkpoint ships its tokenizer as a plain `tokenizer.model`, as published ones do; its
version is read from the model. The weights are random, so under `required` or a named function
only the grammar makes a reply parse and validate. Checked: the prompt of a multi-turn tool
conversation against mistral-common's own encoding; forced calls, greedy and sampled, streamed
and not; the streamed deltas reassembled by the `openai` SDK; the real clients (`openai` tools,
`mistralai` `chat.complete`, LangChain `bind_tools` and `with_structured_output`); and each bad
tool field a 400 naming it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from types import SimpleNamespace

import httpx
import jsonschema
import openai
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MistralRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from pydantic import BaseModel, ConfigDict, Field

from server.protocol import ChatCompletionRequest
from server.response_format import parse_response_format
from server.routes.chat import encode
from server.tools import parse_tools
from tests.checkpoints import V3_TOKENIZER, TinyShape, hf_mixtral, write_hf_mixtral
from tests.server.conftest import API_KEY, MODEL, start_server, stop_server
from tokenization import load_prompt_encoder
from tokenization.mistral_encoder import MistralPromptEncoder, load_plain_sentencepiece
from tokenization.tool_calls import MAX_PARALLEL_CALLS

SHAPE = TinyShape(vocab_size=32768)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    return write_hf_mixtral(hf_mixtral(SHAPE), SHAPE, tmp_path_factory.mktemp("v3-mixtral"), V3_TOKENIZER)


@pytest.fixture(scope="module")
def v3_server(v3_dir, tmp_path_factory):
    running = start_server(v3_dir, tmp_path_factory.mktemp("v3-server") / "server.log", api_key=False)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def http(v3_server):
    with httpx.Client(base_url=v3_server.url, headers=v3_server.headers(), timeout=60) as client:
        yield client


def chat(http: httpx.Client, **body) -> httpx.Response:
    return http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": MAX_TOKENS} | body
    )


def check_calls(message: dict, names: set[str]) -> None:
    assert message["tool_calls"], message
    for call in message["tool_calls"]:
        assert len(call["id"]) == 9 and call["id"].isalnum() and call["type"] == "function"
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


def test_a_plain_tokenizer_model_is_read_as_v3_and_offers_tools(v3_dir, http) -> None:
    encoder = load_prompt_encoder(v3_dir)
    assert isinstance(encoder, MistralPromptEncoder) and encoder.version == TokenizerVersion.v3
    assert encoder.tool_calls_id == 5
    (card,) = [m for m in http.get("/v1/models").json()["data"] if m["id"] == MODEL]
    assert card["capabilities"]["function_calling"] is True


@pytest.mark.parametrize(
    "choice", ["required", "any", {"type": "function", "function": {"name": "get_time"}}]
)
@pytest.mark.parametrize(
    "sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0, "seed": 2}]
)
def test_forced_calls_parse_and_validate(http, choice, sampling) -> None:
    names = {"get_time"} if isinstance(choice, dict) else set(SCHEMAS)
    # A random model writes calls in parallel up to MAX_PARALLEL_CALLS: one is enough here.
    r = chat(http, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, **sampling)
    assert r.status_code == 200, r.text
    (reply,) = r.json()["choices"]
    assert reply["finish_reason"] == "tool_calls" and reply["message"]["content"] == ""
    check_calls(reply["message"], names)
    assert len(reply["message"]["tool_calls"]) == 1


def test_parallel_calls_are_bounded(http) -> None:
    r = chat(http, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=320)
    assert r.status_code == 200, r.text
    reply = r.json()["choices"][0]
    assert reply["finish_reason"] == "tool_calls", reply
    assert 1 <= len(reply["message"]["tool_calls"]) <= MAX_PARALLEL_CALLS
    check_calls(reply["message"], set(SCHEMAS))


def test_the_openai_stream_helper_reassembles_the_collected_calls(v3_server) -> None:
    client = openai.OpenAI(base_url=f"{v3_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    kw = {
        "model": MODEL,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": MAX_TOKENS,
        "parallel_tool_calls": False,  # a random model would write calls up to the bound
    }
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        collected = client.chat.completions.create(**kw, **sampling).choices[0]
        with client.chat.completions.stream(**kw, **sampling) as stream:
            for _ in stream:
                pass
            streamed = stream.get_final_completion().choices[0]
        assert streamed.finish_reason == collected.finish_reason == "tool_calls"
        pairs = [
            [(c.function.name, c.function.arguments) for c in m.tool_calls]
            for m in (streamed.message, collected.message)
        ]
        assert pairs[0] == pairs[1] and pairs[0]
        assert all(len(c.id) == 9 and c.type == "function" for c in streamed.message.tool_calls)


def test_auto_is_free_text_or_calls_and_none_offers_no_tools(http) -> None:
    for seed in range(4):
        reply = chat(http, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=24).json()["choices"][0]
        if reply["message"]["tool_calls"]:
            assert reply["finish_reason"] == "tool_calls"
            check_calls(reply["message"], set(SCHEMAS))
        else:
            assert (
                reply["finish_reason"] in ("stop", "length")
                and "[TOOL_CALLS]" not in reply["message"]["content"]
            )
    plain = chat(http, max_tokens=1).json()["usage"]["prompt_tokens"]
    assert chat(http, tools=TOOLS, tool_choice="none", max_tokens=1).json()["usage"]["prompt_tokens"] == plain
    assert chat(http, tools=TOOLS, max_tokens=1).json()["usage"]["prompt_tokens"] > plain


WEATHER_CALL = {
    "id": "call_0123456789abcdefGHI",  # an OpenAI-style id: the server uses its last 9 characters
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
}
CONVERSATION = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
    {"role": "tool", "tool_call_id": WEATHER_CALL["id"], "name": "get_weather", "content": "21 C, sunny"},
    {"role": "assistant", "content": "It is sunny and 21 C in Paris."},
    {"role": "user", "content": "And the time there?"},
]


def reference_ids(v3_dir) -> list[int]:
    """mistral-common's encoding of CONVERSATION, with the client's id mapped by the stated rule."""
    tokenizer = load_plain_sentencepiece(v3_dir / "tokenizer.model")
    tools = [Tool(function=Function(**t["function"])) for t in TOOLS]
    mapped = CONVERSATION[1]["tool_calls"][0]["id"][-9:]  # a client's id: its last 9 characters
    call = ToolCall(
        id=mapped, function=FunctionCall(name="get_weather", arguments='{"city": "Paris", "unit": "c"}')
    )
    messages = [
        UserMessage(content=CONVERSATION[0]["content"]),
        AssistantMessage(tool_calls=[call]),
        ToolMessage(content="21 C, sunny", tool_call_id=mapped, name="get_weather"),
        AssistantMessage(content=CONVERSATION[3]["content"]),
        UserMessage(content=CONVERSATION[4]["content"]),
    ]
    return tokenizer.encode_chat_completion(MistralRequest(messages=messages, tools=tools, model="m")).tokens


def test_a_tool_conversation_is_encoded_as_mistral_common_encodes_it(v3_dir, http) -> None:
    model = SimpleNamespace(encoder=load_prompt_encoder(v3_dir))
    req = ChatCompletionRequest(model=MODEL, messages=CONVERSATION, tools=TOOLS)
    tools = parse_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
    _, ids = asyncio.run(encode(req, model, parse_response_format(None), tools))  # type: ignore[arg-type]
    expected = reference_ids(v3_dir)
    assert ids == expected
    r = chat(http, messages=CONVERSATION, tools=TOOLS, max_tokens=1)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(expected), r.text


def function(**fields) -> dict:
    return {"type": "function", "function": fields}


BAD_ID_CALL = {**WEATHER_CALL, "id": "call_12345-678"}
BAD = {
    "unknown-choice": ({"tools": TOOLS, "tool_choice": function(name="nope")}, "tool_choice"),
    "choice-word": ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    "schema-not-object": ({"tools": [function(name="f", parameters="x")]}, "tools[0].function.parameters"),
    "schema-invalid": (
        {"tools": [function(name="f", parameters={"type": "foo"})], "tool_choice": "required"},
        "tools[0].function.parameters",
    ),
    "bad-name": ({"tools": [function(name="a b")]}, "tools[0].function.name"),
    "no-tool-call-id": ({"messages": [*CONVERSATION[:2], {"role": "tool", "content": "x"}]}, "messages[2]"),
    "bad-tool-call-id": (
        {"messages": [CONVERSATION[0], {**CONVERSATION[1], "tool_calls": [BAD_ID_CALL]}]},
        "messages[1]",
    ),
    "unanswered-id": (
        {"messages": [*CONVERSATION[:2], {**CONVERSATION[2], "tool_call_id": "zzzzzzzzz"}]},
        "messages[2]",
    ),
    "required-without-tools": ({"tool_choice": "required"}, "tool_choice"),
    "schema-keyword-not-string": (
        {"tools": [function(name="f", parameters={"$schema": 1})]},
        "tools[0].function.parameters",
    ),
    "colliding-ids": (
        {
            "messages": [
                CONVERSATION[0],
                {
                    **CONVERSATION[1],
                    "tool_calls": [WEATHER_CALL, {**WEATHER_CALL, "id": "call_other_456789abcdefGHI"}],
                },
            ]
        },
        "messages[1]",
    ),
    "with-response-format": ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
}


@pytest.mark.parametrize(("body", "param"), BAD.values(), ids=BAD.keys())
def test_bad_tool_fields_get_a_400_naming_the_field(http, body, param) -> None:
    r = chat(http, **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert chat(http, max_tokens=1).status_code == 200  # the connection serves on


def test_tools_on_a_v1_model_are_a_400(server) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers(), json={
        "model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 2}, timeout=30)  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text


# --- real clients ---


class Weather(BaseModel):
    """The weather in a city."""

    model_config = ConfigDict(extra="forbid")  # closed: a random model cannot add keys forever

    city: str = Field(max_length=10)
    unit: str = Field(pattern="^(c|f)$")


def test_mistralai_complete_with_tools(v3_server) -> None:
    from mistralai.client import Mistral

    client = Mistral(api_key=API_KEY, server_url=v3_server.url, timeout_ms=60_000)
    r = client.chat.complete(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="any",
        parallel_tool_calls=False,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls"
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_langchain_bind_tools_and_function_calling_output(v3_server) -> None:
    from langchain_mistralai import ChatMistralAI
    from langchain_openai import ChatOpenAI

    openai_chat = ChatOpenAI(base_url=f"{v3_server.url}/v1", api_key=API_KEY, model=MODEL, temperature=0,
                             max_tokens=MAX_TOKENS, max_retries=0)  # fmt: skip
    message = openai_chat.bind_tools([WEATHER], tool_choice="required", parallel_tool_calls=False).invoke(
        ASK[0]["content"]
    )
    (call,) = message.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], SCHEMAS["get_weather"])
    mistral_chat = ChatMistralAI(endpoint=f"{v3_server.url}/v1", api_key=API_KEY, model=MODEL, temperature=0,
                                 max_tokens=MAX_TOKENS, max_retries=0)  # fmt: skip
    for chat_model in (openai_chat, mistral_chat):
        weather = chat_model.with_structured_output(Weather, method="function_calling").invoke(
            ASK[0]["content"]
        )
        assert isinstance(weather, Weather), weather


def test_the_readmes_tool_example_runs_against_a_v3_model(v3_server) -> None:
    """The README's curl, with its placeholders (URL, model) replaced by this server's."""
    from tests.test_readme import EXAMPLE_URL, code_blocks, section

    blocks = code_blocks(section("Using the API"))
    (curl,) = [code for lang, code in blocks if lang == "text" and "tools" in code]
    command = curl.replace(EXAMPLE_URL, v3_server.url).replace('"MODEL"', f'"{MODEL}"')
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    (choice,) = json.loads(done.stdout)["choices"]
    assert choice["finish_reason"] == "tool_calls", done.stdout
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and "city" in json.loads(call["function"]["arguments"])


def test_a_fragment_leaves_id_and_type_out_and_the_stream_matches_a_cut_reply(http) -> None:
    """A reply cut by max_tokens mid-arguments: the stream's deltas and the collected reply give
    the same partial calls and both say `length`; fragments carry no id or type."""
    body = {"tools": TOOLS, "tool_choice": "required", "temperature": 0, "max_tokens": 18}
    collected = chat(http, **body).json()["choices"][0]
    calls: dict[int, dict] = {}
    finish = None
    with http.stream("POST", "/v1/chat/completions", json={
        "model": MODEL, "messages": ASK, "stream": True, **body}) as r:  # fmt: skip
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            finish = choice["finish_reason"] or finish
            for d in choice["delta"].get("tool_calls") or []:
                if "id" in d:
                    calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "arguments": ""}
                else:
                    assert "type" not in d and d["function"]["name"] == ""
                calls[d["index"]]["arguments"] += d["function"]["arguments"]
    assert finish == collected["finish_reason"] == "length"
    got = [(c["name"], c["arguments"]) for c in calls.values()]
    assert got and got == [
        (c["function"]["name"], c["function"]["arguments"]) for c in collected["message"]["tool_calls"] or []
    ]


def test_refs_resolve_in_each_functions_own_parameters(http) -> None:
    parameters = {
        "$defs": {"Unit": {"enum": ["c", "f"]}},
        "type": "object",
        "properties": {"unit": {"$ref": "#/$defs/Unit"}, "again": {"$ref": "#/properties/unit"}},
        "required": ["unit", "again"],
        "additionalProperties": False,
    }
    tools = [function(name="convert", parameters=parameters)]
    reply = chat(http, tools=tools, tool_choice="required", temperature=0).json()["choices"][0]
    assert reply["finish_reason"] == "tool_calls", reply
    (call,) = reply["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), parameters)


def test_a_function_named_like_a_choice_is_still_the_named_function(http) -> None:
    tools = [function(name="none", parameters=SCHEMAS["get_time"]), WEATHER]
    reply = chat(http, tools=tools, tool_choice=function(name="none"), temperature=0).json()["choices"][0]
    assert reply["finish_reason"] == "tool_calls"
    assert {c["function"]["name"] for c in reply["message"]["tool_calls"]} == {"none"}


def test_tool_choice_none_keeps_a_response_format(http) -> None:
    body = {
        "tools": TOOLS,
        "tool_choice": "none",
        "response_format": {"type": "json_object"},
        "max_tokens": 8,
    }
    reply = chat(http, temperature=0, **body).json()["choices"][0]
    assert reply["message"]["content"].startswith("{") and reply["message"]["tool_calls"] is None


def test_without_tools_offered_the_tool_token_is_never_sampled(http) -> None:
    """Even pushed by logit_bias, a reply with no tools offered cannot open tool calls."""
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        body = {"logit_bias": {"5": 100}, "max_tokens": 4, "temperature": 0, "logprobs": True, **extra}
        reply = chat(http, **body).json()["choices"][0]
        assert reply["message"]["tool_calls"] is None
        assert "[TOOL_CALLS]" not in [e["token"] for e in reply["logprobs"]["content"]]
    push = {"logit_bias": {"5": 100}, "parallel_tool_calls": False, "temperature": 0}
    pushed = chat(http, tools=TOOLS, **push).json()["choices"][0]
    assert pushed["finish_reason"] == "tool_calls"  # offered (auto), the same push opens calls
