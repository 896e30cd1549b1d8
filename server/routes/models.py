"""GET /v1/models and /v1/models/{id}: cards that the openai and both mistralai SDKs parse."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from server.deps import get_state, ready_model
from server.openapi import KEYED, errors
from server.protocol import ModelCard, ModelList
from server.state import AppState, ServedModel

router = APIRouter()


@router.get("/v1/models", responses=errors(*KEYED, 503))
async def list_models(model: Annotated[ServedModel, Depends(ready_model)]) -> ModelList:
    cards = [model.card()] + [model.card().model_copy(update={"id": alias}) for alias in model.aliases]
    return ModelList(data=cards)


@router.get("/v1/models/{model_id:path}", responses=errors(*KEYED, 404, 503))
async def get_model(model_id: str, state: Annotated[AppState, Depends(get_state)]) -> ModelCard:
    return state.resolve(model_id).card().model_copy(update={"id": model_id})
