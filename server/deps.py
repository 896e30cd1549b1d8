"""FastAPI dependencies: the app state, injected rather than global.

They are `async def` so FastAPI runs them on the event loop: a plain `def` dependency would take a
worker-thread hop on every request, and the admission check below would race with other requests'
checks from other threads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request

from server.errors import ServiceUnavailable
from server.state import AppState, ServedModel


async def get_state(request: Request) -> AppState:
    return request.app.state.mixtral


async def ready_model(request: Request) -> ServedModel:
    """The served model, for routes that need it: 503 `not_ready` while it loads."""
    state: AppState = request.app.state.mixtral
    return state.served()


async def serving_state(request: Request) -> AsyncIterator[AppState]:
    """The state, for routes that start generation: refuses work while loading, draining or overloaded.

    The admission slot is held until the response has been sent, streamed or not: FastAPI closes
    a request-scoped dependency after the response.
    """
    state: AppState = request.app.state.mixtral
    if state.shutting_down:
        raise ServiceUnavailable("The server is shutting down", "shutting_down")
    state.served()
    with state.admission.slot():
        yield state
