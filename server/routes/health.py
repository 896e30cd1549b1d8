"""Liveness and readiness: open without an API key (RELIABILITY.md items 15-17, 20)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from server.deps import get_state
from server.protocol import HealthStatus, ReadyStatus
from server.state import AppState

router = APIRouter()


@router.get(
    "/health",
    response_model=HealthStatus,
    responses={503: {"model": HealthStatus, "description": "The engine loop died"}},
)
async def health(state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
    """200 while the process runs and the engine loop is alive (or still loading)."""
    dead = state.engine.dead_error
    if dead is not None:
        return JSONResponse({"status": "dead", "error": str(dead)[:200]}, 503)
    return JSONResponse({"status": "ok"})


@router.get(
    "/ready",
    response_model=ReadyStatus,
    responses={503: {"model": ReadyStatus, "description": "Loading, or shutting down"}},
)
async def ready(state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
    """200 once weights are loaded and a warm-up forward succeeded; 503 before, and when draining."""
    if state.shutting_down:
        return JSONResponse({"status": "shutting_down"}, 503)
    if state.model is None or not state.is_ready:
        return JSONResponse({"status": "loading"}, 503)
    return JSONResponse({"status": "ready", "model": state.model.name})
