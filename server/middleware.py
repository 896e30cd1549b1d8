"""ASGI middleware: a last-resort 500, API keys, body limits, content types.

Pure ASGI (not `BaseHTTPMiddleware`) so streaming responses pass through untouched.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import INTERNAL_ERROR_BODY, error_body

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready"})
# Open too with `open_metrics` (server/settings.py).
METRICS_PATHS = frozenset({"/metrics", "/get_load"})


async def _send_json(
    send: Send, status: int, body: dict, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


async def drop_body(scope: Scope, receive: Receive, bound: int) -> bool:
    """Read and drop a refused request's body, up to `bound` bytes, before answering it.

    httpx (so both SDKs) writes the whole body before it reads a response. Were the server to
    answer with the body unread, uvicorn would go on reading and dropping it after the answer
    with no bound; were it to close instead, the client would see a reset, not the answer.
    False when the connection must close after the answer: the body is declared or found longer
    than `bound`, or the client waits for "100 Continue" and would send it only if asked.
    """
    headers = dict(scope["headers"])
    length = headers.get(b"content-length")
    if headers.get(b"expect", b"").lower() == b"100-continue":
        return False
    if length is not None and length.isdigit() and int(length) > bound:
        return False
    return await drop_rest(receive, bound, 0)


async def drop_rest(receive: Receive, bound: int, seen: int) -> bool:
    """Read and drop the rest of a body of which `seen` bytes were read; True if it ended within `bound`."""
    while seen <= bound:
        message = await receive()
        if message["type"] != "http.request":
            return False  # the client left
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return seen <= bound
    return False


def _closing(close: bool) -> list[tuple[bytes, bytes]]:
    return [(b"connection", b"close")] if close else []


class ServerErrors:
    """A bug (an exception no typed handler maps) becomes a 500, logged with its traceback.

    Starlette's own last resort answers and then re-raises to uvicorn, which closes the
    connection, so a client's next request on it fails with "connection reset". Answered here,
    the connection stays open and the access log and `X-Request-Id` cover the 500 too. Once the
    response has started there is nothing left to answer with, and the error goes on to uvicorn.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            if started:
                raise
            request_id = scope.get("state", {}).get("request_id")
            logger.exception(
                "unexpected error serving %s %s (request %s)",
                scope["method"],
                scope["path"][:200],
                request_id,
            )
            await _send_json(send, 500, INTERNAL_ERROR_BODY)


class ApiKeyAuth:
    """Bearer keys on everything but `open_paths` (liveness and readiness; with `open_metrics`
    the metrics too); constant-time comparison.

    The check runs on the normalised path Starlette routes on, so `//v1/...`, dot segments,
    `%2F` or a trailing slash cannot reach a route without a key: anything not in `open_paths`,
    exactly, needs one.
    """

    def __init__(
        self, app: ASGIApp, keys: Sequence[str], discard_bytes: int, open_paths: frozenset[str] = OPEN_PATHS
    ) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = open_paths
        self.discard_bytes = discard_bytes  # of a refused body, read and dropped (see drop_body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        ok = scheme.lower() == b"bearer" and any(hmac.compare_digest(token.strip(), k) for k in self.keys)
        if not ok:
            body = error_body("Invalid or missing API key", "authentication_error", None, "invalid_api_key")
            close = not await drop_body(scope, receive, self.discard_bytes)
            return await _send_json(send, 401, body, [(b"www-authenticate", b"Bearer"), *_closing(close)])
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for bodies over `max_bytes`, answered so that the client can read it (see drop_body).

    A refused body is read and dropped up to `discard_bytes`, so the connection stays open; a
    longer one is answered at once with `Connection: close`. Every accepted body is buffered up
    to the limit (a Content-Length header alone is no bound) before the app sees it, then replayed.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, discard_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.discard_bytes = discard_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send, close=not await drop_body(scope, receive, self.discard_bytes))
        # Count what arrives even under a small Content-Length: sent next to
        # `Transfer-Encoding: chunked`, the server reads the chunked body, however long.
        buffered: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                more = message.get("more_body", False)
                ended = not more or await drop_rest(receive, self.discard_bytes, seen)
                return await self._refuse(send, close=not ended)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, close: bool) -> None:
        body = error_body(
            f"Request body larger than {self.max_bytes} bytes", "invalid_request_error", None, "too_large"
        )
        await _send_json(send, 413, body, _closing(close))


class JsonContentType:
    """415 for a POST whose declared content type is not JSON (a missing one is read as JSON)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            ctype = dict(scope["headers"]).get(b"content-type", b"application/json").split(b";")[0].strip()
            if ctype.lower() not in (b"application/json", b""):
                message = "Content-Type must be application/json"
                return await _send_json(
                    send, 415, error_body(message, "invalid_request_error", None, "unsupported_media_type")
                )
        await self.app(scope, receive, send)
