"""GET /metrics: Prometheus text format (protected by the API key like /v1 when keys are set)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import get_state
from server.errors import NotFound
from server.state import AppState

router = APIRouter()


@router.get("/metrics")
async def metrics(state: Annotated[AppState, Depends(get_state)]) -> Response:
    if state.metrics is None:
        raise NotFound("metrics are not enabled")
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
