"""Server-sent events: the response every stream is sent as, and the JSON each event carries."""

from __future__ import annotations

from collections.abc import AsyncIterator

from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PING_S = 15  # a `: ping` comment on an idle stream; every client we support skips it

# JSON may carry these raw inside a string, but line readers built on Python's `str.splitlines`
# (httpx's `iter_lines`, so the SDKs' stream parsers) also break lines at them, cutting a `data:`
# line in two. Escaped, the JSON means the same.
_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_json(chunk: BaseModel) -> str:
    """`chunk` as JSON text for one `data:` line."""
    return chunk.model_dump_json().translate(_LINE_BREAKS)


def event_stream(events: AsyncIterator[str]) -> EventSourceResponse:
    """`data: <event>` per item, with the headers proxies need to pass a stream through."""
    return EventSourceResponse(events, sep="\n", headers=SSE_HEADERS, ping=PING_S)
