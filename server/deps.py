"""FastAPI dependencies: the app state, injected rather than global.

They are `async def` so FastAPI runs them on the event loop: a plain `def` dependency would take a
worker-thread hop on every request, and the admission check below would race with other requests'
checks from other threads.
"""

from __future__ import annotations

from fastapi import Request

from server.errors import Overloaded, ServiceUnavailable
from server.state import AppState


async def get_state(request: Request) -> AppState:
    return request.app.state.mixtral


async def serving_state(request: Request) -> AppState:
    """The state, for routes that start generation: refuses work while draining or overloaded."""
    state: AppState = request.app.state.mixtral
    if state.shutting_down:
        raise ServiceUnavailable("The server is shutting down", "shutting_down")
    if state.engine.num_active_requests >= state.max_active_requests:
        raise Overloaded(f"Too many requests in flight ({state.max_active_requests}); retry shortly")
    return state
