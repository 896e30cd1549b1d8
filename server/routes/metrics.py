"""GET /metrics (Prometheus text format) and GET /get_load (`{"load": N}`, the requests in flight,
polled by vllm-router's and sglang-router's power-of-two policy); both need the API key like /v1
when keys are set, unless `open_metrics` opens them for routers that scrape without one."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from server.deps import get_state
from server.errors import NotFound
from server.openapi import KEYED, errors
from server.state import AppState

router = APIRouter()
TEXT: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


@router.get("/metrics", response_model=None, responses=TEXT | errors(*KEYED, 404))
async def metrics(state: Annotated[AppState, Depends(get_state)]) -> Response:
    if state.metrics is None:
        raise NotFound("metrics are not enabled")
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


class Load(BaseModel):
    load: int  # requests in flight: running, waiting, or still streaming out


@router.get("/get_load", response_model=Load, responses=errors(*KEYED))
async def get_load(state: Annotated[AppState, Depends(get_state)]) -> Load:
    return Load(load=state.engine.num_active_requests)
