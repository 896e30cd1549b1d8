"""Every class of request the server refuses, sent as the SDKs send (one keep-alive connection,
the whole body before reading), interleaved with valid requests: each gets its 4xx, its error
body and `X-Request-Id`, its status in the access log, no traceback, and the connection stays open.

Also the body limit (RELIABILITY.md item 4): a refused body within the discard bound is read, so
a client that writes it whole sees its 413; beyond the bound the server stops reading.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from dataclasses import dataclass, field

import httpx
import pytest

from server.settings import DISCARD_FACTOR
from tests.server.conftest import API_KEY, MODEL
from tests.server.test_bad_input import check_error

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MB = 1024 * 1024
LIMIT = 2 * MB  # the server's default max_body_bytes
DISCARD_BOUND = DISCARD_FACTOR * LIMIT
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
USER = {"role": "user", "content": "a"}


def chat_body(**fields) -> dict:
    return GOOD | fields


def chat(**fields) -> dict:
    return {"json": chat_body(**fields)}


def raw(text: str, path: str = CHAT) -> dict:
    return {"content": text.encode(), "path": path}


def escaped(body: dict, path: str = CHAT) -> dict:
    """`body` as JSON with every non-ASCII character escaped: lone surrogates as `\\udXXX`."""
    return raw(json.dumps(body), path)


def big_chunks(total: int):
    yield b'{"model": "'
    for _ in range(total // (64 * 1024)):
        yield b"x" * (64 * 1024)


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    send: dict = field(default_factory=dict)  # httpx arguments; `path` and `method` are ours
    param: str | None = None  # the error's `param`, where the server can name one
    code: str | None = None


PREFIXED = {"role": "assistant", "content": "b", "prefix": True}
TOOL_CALL = {"id": "abcdefghi", "function": {"name": "f", "arguments": "{}"}}
LONG = " the" * 3000
TOO_LONG = "context_length_exceeded"

REFUSED = [
    # malformed bodies
    Case("truncated-json", 400, raw('{"model": ')),
    Case("json-array", 400, raw("[1, 2]")),
    Case("invalid-utf8", 400, {"content": b'{"model": "\xff"}'}),
    Case("text-plain", 415, raw(json.dumps(GOOD)) | {"headers": {"Content-Type": "text/plain"}}),
    Case("body-3x-the-limit", 413, {"json": GOOD | {"pad": "x" * (3 * LIMIT)}}),
    Case("chunked-3x-the-limit", 413, {"content_factory": lambda: big_chunks(3 * LIMIT)}),
    # lone surrogates, wherever they are
    Case("surrogate-content", 400, escaped(chat_body(messages=[{"role": "user", "content": "h\ud800i"}])),
         "messages[0].content"),
    Case("surrogate-model", 400, escaped(chat_body(model="\udfff")), "model"),
    Case("surrogate-stop", 400, escaped(chat_body(stop=["ok", "\ud83d"])), "stop[1]"),
    Case("surrogate-key", 400, escaped(chat_body(messages=[{"role": "user", "content": "a", "\ud800": 1}])),
         "messages[0]"),
    Case("surrogate-prompt", 400, escaped({"model": MODEL, "prompt": "x\ud800"}, COMPLETIONS), "prompt"),
    Case("surrogate-tokenize", 400, escaped({"prompt": "\udc00"}, "/tokenize"), "prompt"),
    # conversations
    Case("empty-messages", 400, chat(messages=[]), "messages"),
    Case("last-assistant", 400, chat(messages=[USER, {"role": "assistant", "content": "b"}]), "messages[1]"),
    Case("null-content", 400, chat(messages=[{"role": "user", "content": None}]), "messages[0]"),
    Case("unknown-role", 400, chat(messages=[USER, {"role": "robot", "content": "a"}]), "messages[1]"),
    Case("prefix-not-last", 400, chat(messages=[USER, PREFIXED, USER]), "messages[1]"),
    Case("tool-calls", 400, chat(messages=[USER, {"role": "assistant", "tool_calls": [TOOL_CALL]}, USER]),
         "messages[1]"),
    # values
    Case("temperature-nan", 400, raw(json.dumps(GOOD)[:-1] + ', "temperature": NaN}'), "temperature"),
    Case("max-tokens-zero", 400, chat(max_tokens=0), "max_tokens"),
    Case("max-tokens-string", 400, chat(max_tokens="10"), "max_tokens"),
    Case("n-huge", 400, chat(n=10**6), "n"),
    Case("top-logprobs-alone", 400, chat(top_logprobs=3), "top_logprobs"),
    Case("logit-bias-fan-out", 400, chat(logit_bias={str(i): 1 for i in range(5000)}), "logit_bias"),
    Case("stop-shape", 422, chat(stop=7), "stop"),
    Case("missing-messages", 422, {"json": {"model": MODEL}}, "messages"),
    Case("context-length", 400, chat(messages=[{"role": "user", "content": LONG}]), code=TOO_LONG),
    Case("context-length-completion", 400, {"json": {"model": MODEL, "prompt": LONG}, "path": COMPLETIONS},
         code=TOO_LONG),
    Case("response-format", 400, chat(response_format={"type": "xml"}), "response_format.type"),
    Case("tools", 400, chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    Case("suffix", 400, {"json": {"model": MODEL, "prompt": "a", "suffix": "b"}, "path": COMPLETIONS},
         "suffix"),
    Case("detokenize-out-of-vocab", 400, {"json": {"tokens": [1, 10**9]}, "path": "/detokenize"}, "tokens"),
    # models, routes, keys
    Case("unknown-model", 404, chat(model="nope"), "model", "model_not_found"),
    Case("unknown-route", 404, {"path": "/v1/nowhere"}),
    Case("unknown-model-card", 404, {"method": "GET", "path": "/v1/models/nope"}),
    Case("wrong-method", 405, {"method": "GET"}),
    Case("missing-key", 401, {"json": GOOD, "headers": {"Authorization": ""}}),
    Case("wrong-key", 401, {"json": GOOD, "headers": {"Authorization": "Bearer wrong"}}),
]  # fmt: skip

VALID = [
    {"json": GOOD},
    {"json": GOOD | {"stream": True}},
    {"json": {"model": MODEL, "prompt": "The sky", "max_tokens": 2, "temperature": 0}, "path": COMPLETIONS},
    {"method": "GET", "path": "/v1/models"},
]


class Connections:
    """Counts the TCP connections httpx opens (its `trace` extension reports each one)."""

    def __init__(self) -> None:
        self.opened = 0

    def __call__(self, event: str, info: dict) -> None:
        if event == "connection.connect_tcp.complete":
            self.opened += 1


def send(client: httpx.Client, connections: Connections, spec: dict, request_id: str) -> httpx.Response:
    spec = dict(spec)
    method, path = spec.pop("method", "POST"), spec.pop("path", CHAT)
    if "content_factory" in spec:
        spec["content"] = spec.pop("content_factory")()
    headers = {"Authorization": f"Bearer {API_KEY}", "X-Request-Id": request_id}
    headers |= {"Content-Type": "application/json"} if method == "POST" else {}
    headers |= spec.pop("headers", {})
    if not headers["Authorization"]:
        del headers["Authorization"]
    return client.request(method, path, headers=headers, extensions={"trace": connections}, **spec)


def access_log_entries(log_text: str) -> dict[str, dict]:
    """request id -> its access-log line."""
    out = {}
    for line in log_text.splitlines():
        if "mixtral_server.access: " in line:
            entry = json.loads(line.split("mixtral_server.access: ", 1)[1])
            out[entry["request_id"]] = entry
    return out


def access_log(log_text: str) -> dict[str, int]:
    """request id -> the status its access-log line records."""
    return {rid: entry["status"] for rid, entry in access_log_entries(log_text).items()}


def one_connection_client(server) -> httpx.Client:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.Client(base_url=server.url, limits=limits, timeout=60)


def test_every_refusal_keeps_the_connection(server):
    log_start = server.log.stat().st_size
    connections = Connections()
    sent: dict[str, int] = {}  # request id -> the status the client got
    with one_connection_client(server) as client:
        for round_ in range(2):
            for i, case in enumerate(REFUSED):
                rid = f"{case.name}-{round_}-{uuid.uuid4().hex[:6]}"
                r = send(client, connections, case.send, rid)
                body = check_error(r, case.status)
                assert r.headers["x-request-id"] == rid, case.name
                if case.param is not None:
                    assert body["error"]["param"] == case.param, (case.name, body)
                if case.code is not None:
                    assert body["error"]["code"] == case.code, (case.name, body)
                sent[rid] = r.status_code
                valid = VALID[i % len(VALID)]
                vid = f"valid-{round_}-{i}"
                ok = send(client, connections, valid, vid)
                assert ok.status_code == 200, (case.name, ok.text[:300])
                assert ok.headers["x-request-id"] == vid
                if valid["json"].get("stream") if "json" in valid else False:
                    assert ok.text.endswith("data: [DONE]\n\n")
                sent[vid] = 200
    assert len([rid for rid, status in sent.items() if status != 200]) >= 60
    assert connections.opened == 1, "a refusal closed the keep-alive connection"
    deadline = time.monotonic() + 10  # the access-log line is written just after the response
    while time.monotonic() < deadline:
        text = server.log.read_text(errors="replace")[log_start:]
        logged = access_log(text)
        if set(sent) <= set(logged):
            break
        time.sleep(0.1)
    assert {rid: logged.get(rid) for rid in sent} == sent  # status 0: the app raised instead
    assert "Traceback" not in text and "Exception in ASGI application" not in text


def test_a_conversation_error_keeps_the_connection(server):
    """Point 1 alone: a typed error of the tokenizer, once mapped by the catch-all only."""
    connections = Connections()
    with one_connection_client(server) as client:
        for i in range(3):
            r = send(
                client, connections, chat(messages=[USER, {"role": "assistant", "content": "b"}]), f"conv-{i}"
            )
            check_error(r, 400)
            assert r.headers["x-request-id"] == f"conv-{i}"
            assert send(client, connections, {"json": GOOD}, f"next-{i}").status_code == 200
    assert connections.opened == 1


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, chat_body(messages=[{"role": "user", "content": "\ud800"}]), "messages[0].content"),
        (CHAT, chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": "a\udfffb"}]}]),
         "messages[0].content[0].text"),
        (COMPLETIONS, {"model": MODEL, "prompt": ["fine", "\udbff"]}, "prompt[1]"),
        ("/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ],
    ids=["chat", "chat-chunk", "completions", "tokenize"],
)  # fmt: skip
def test_a_lone_surrogate_is_a_400_naming_the_field(server, path, body, param):
    with one_connection_client(server) as client:
        r = send(client, Connections(), escaped(body, path), "surrogate")
    body = check_error(r, 400)
    assert body["error"]["param"] == param and "lone surrogate" in body["error"]["message"], body


def test_a_generated_request_id_on_every_refusal(server):
    with one_connection_client(server) as client:
        for path in ("/v1/nowhere", CHAT):
            r = client.post(path, content=b"[", headers={"Authorization": f"Bearer {API_KEY}"})
            assert r.status_code in (400, 404) and len(r.headers["x-request-id"]) == 32


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_read_so_its_413_arrives(server, chunked):
    """httpx writes the whole body first: at 3x the limit it still reads the 413, on a connection
    that then serves the next request."""
    connections = Connections()
    with one_connection_client(server) as client:
        spec = (
            {"content_factory": lambda: big_chunks(3 * LIMIT)}
            if chunked
            else {"json": GOOD | {"pad": "x" * (3 * LIMIT)}}
        )
        r = send(client, connections, spec, "big")
        check_error(r, 413)
        assert "content-length" not in r.request.headers if chunked else True
        assert r.headers.get("connection") != "close"
        assert send(client, connections, {"json": GOOD}, "after").status_code == 200
    assert connections.opened == 1


def bytes_accepted(server, head: str, body_chunk: bytes, limit_s: float = 20) -> tuple[int, bytes]:
    """Write `body_chunk` over and over after `head` until the server stops reading (or 64 MB);
    how many body bytes it took, and what it answered."""
    host, port = server.url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        s.sendall(head.encode())
        deadline = time.monotonic() + limit_s
        try:
            while sent < 64 * MB and time.monotonic() < deadline:
                s.sendall(body_chunk)
                sent += len(body_chunk)
        except OSError:  # reset or timed out: the server stopped reading
            pass
        answer = b""
        try:
            while part := s.recv(65536):
                answer += part
        except OSError:
            pass
    return sent, answer


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_beyond_the_discard_bound_the_server_stops_reading(server, chunked):
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
    head += "Content-Type: application/json\r\n"
    piece = b"x" * (256 * 1024)
    if chunked:
        head += "Transfer-Encoding: chunked\r\n\r\n"
        piece = b"%x\r\n%s\r\n" % (len(piece), piece)
    else:
        head += f"Content-Length: {64 * MB}\r\n\r\n"
    sent, answer = bytes_accepted(server, head, piece)
    # What the server read, plus what the two sockets' buffers hold (a few MB on loopback).
    assert sent < DISCARD_BOUND + 16 * MB, f"the server read {sent / MB:.0f} MB of a refused body"
    if answer:
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_client_waiting_for_100_continue_gets_the_413_at_once(server):
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {3 * LIMIT}\r\nExpect: 100-continue\r\n\r\n"
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode())  # and no body: it waits to be asked for one
        answer = b""
        while part := s.recv(65536):
            answer += part
    assert answer.startswith(b"HTTP/1.1 413") and b"100 Continue" not in answer, answer[:300]
    assert b"connection: close" in answer.lower()


def test_a_refused_key_reads_the_body_within_the_bound_only(server):
    """A 401 drops the body as a 413 does: read within the bound (the connection stays open),
    not read beyond it (the connection closes)."""
    connections = Connections()
    with one_connection_client(server) as client:
        r = send(
            client, connections, {"json": GOOD | {"pad": "x" * LIMIT}, "headers": {"Authorization": ""}}, "k"
        )
        check_error(r, 401)
        assert send(client, connections, {"json": GOOD}, "after").status_code == 200
    assert connections.opened == 1
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n"
    piece = b"x" * (256 * 1024)
    sent, answer = bytes_accepted(server, head, b"%x\r\n%s\r\n" % (len(piece), piece))
    assert sent < DISCARD_BOUND + 16 * MB, f"the server read {sent / MB:.0f} MB of an unauthorized body"
    if answer:
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
