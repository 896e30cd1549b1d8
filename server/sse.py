"""Server-sent events: the response every stream is sent as, and the JSON each event carries."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse, SendTimeoutError
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PING_S = 15  # a `: ping` comment on an idle stream; every client we support skips it

# JSON may carry these raw inside a string, but line readers built on Python's `str.splitlines`
# (httpx's `iter_lines`, so the SDKs' stream parsers) also break lines at them, cutting a `data:`
# line in two. Escaped, the JSON means the same.
_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_json(chunk: BaseModel) -> str:
    """`chunk` as JSON text for one `data:` line."""
    return chunk.model_dump_json().translate(_LINE_BREAKS)


class _Stream(EventSourceResponse):
    """An SSE response that gives up on a client who stopped reading.

    A send that waits longer than `send_timeout` (the client's receive window stayed shut) ends
    the stream: the events' generator is closed, which aborts the request in the engine and
    frees its KV blocks, and the admission slot goes with the response. uvicorn then closes the
    connection, saying so in its log ("returned without completing response"); the socket itself
    lingers until the peer reads or its TCP connection times out, holding a file descriptor and
    what its buffers hold, no more.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except* SendTimeoutError:  # the data's send or a ping's, or both at once
            request_id = scope.get("state", {}).get("request_id")
            logger.warning(
                "stream %s aborted: its client read nothing for %s s", request_id, self.send_timeout
            )


def event_stream(events: AsyncIterator[str], stall_timeout_s: float | None) -> EventSourceResponse:
    """`data: <event>` per item, with the headers proxies need to pass a stream through; a client
    that reads nothing for `stall_timeout_s` loses its stream."""
    return _Stream(events, sep="\n", headers=SSE_HEADERS, ping=PING_S, send_timeout=stall_timeout_s)
