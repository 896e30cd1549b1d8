"""POST /tokenize and POST /detokenize (as vLLM offers them): the exact ids a request would use."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends

from server.deps import get_state
from server.errors import BadRequest
from server.protocol import DetokenizeRequest, TokenizeRequest
from server.state import AppState, ServedModel
from tokenization import parse_messages, with_safe_prompt

router = APIRouter()


def _model(state: AppState, name: str | None) -> ServedModel:
    return state.model if name is None else state.resolve(name)


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, state: Annotated[AppState, Depends(get_state)]) -> dict:
    """Text (`prompt`) or a chat (`messages`, with `safe_prompt`) -> the prompt ids the API would use."""
    model = _model(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise BadRequest("give exactly one of `prompt` and `messages`", param="prompt")
    if req.messages is not None:
        messages = parse_messages(req.messages)
        if req.safe_prompt:
            messages = with_safe_prompt(messages)
        ids = await asyncio.to_thread(model.encoder.encode_chat, messages)
    else:
        ids = model.encoder.encode_text(req.prompt or "", bos=req.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": model.max_model_len}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, state: Annotated[AppState, Depends(get_state)]) -> dict:
    model = _model(state, req.model)
    check_token_ids(req.tokens, model)
    return {"prompt": model.encoder.decode(list(req.tokens))}


def check_token_ids(ids: list[int], model: ServedModel) -> None:
    vocab = model.encoder.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise BadRequest(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens")
