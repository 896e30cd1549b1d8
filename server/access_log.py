"""Request ids and the access log: one structured line per request (RELIABILITY.md item 24).

Every response carries `X-Request-Id` (the client's, or one made here). The line has the id,
method, path, status and duration; a generating request adds what the streaming core noted in
its `RequestRecord`: prompt and completion tokens, queue time, time to first token, and each
choice's finish reason. Never the prompt or the generated text.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("mixtral_server.access")

_REQUEST_ID_MAX = 128
_RECORD = "request_record"  # its key in the ASGI scope's state


@dataclass(slots=True)
class RequestRecord:
    """What a generating request reports to its access-log line."""

    start: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_time_s: float | None = None  # arrival in the engine to its first step (first prompt)
    ttft_s: float | None = None  # from the request's arrival to its first generated token
    finish_reasons: list[str | None] = field(default_factory=list)  # one per choice

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reasons": self.finish_reasons,
        }
        if self.queue_time_s is not None:
            out["queue_time_ms"] = round(self.queue_time_s * 1e3, 1)
        if self.ttft_s is not None:
            out["ttft_ms"] = round(self.ttft_s * 1e3, 1)
        return out


def request_record(scope: Scope, num_choices: int) -> RequestRecord:
    """The record of the request in `scope`, started when its access-log middleware saw it."""
    state = scope.setdefault("state", {})
    record = RequestRecord(start=state.get("request_start", time.monotonic()))
    record.finish_reasons = [None] * num_choices
    state[_RECORD] = record
    return record


class RequestContext:
    """`X-Request-Id` on every response (echoed or generated) and one structured access-log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")[:_REQUEST_ID_MAX]
        request_id = given if given and given.isprintable() else uuid.uuid4().hex
        start = time.monotonic()
        state = scope.setdefault("state", {})
        state["request_id"], state["request_start"] = request_id, start
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            line = {
                "request_id": request_id,
                "method": scope["method"],
                "path": scope["path"][:200],
                "status": status,
                "duration_ms": round((time.monotonic() - start) * 1e3, 1),
            }
            record = state.get(_RECORD)
            if record is not None:
                line |= record.fields()
            access_log.info(json.dumps(line))
