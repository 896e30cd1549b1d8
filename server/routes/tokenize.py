"""POST /tokenize and POST /detokenize (as vLLM offers them): the exact ids a request would use.

`messages` go through the chat route's own path (parse_messages, with_safe_prompt, encode_chat),
so the ids are the ones `/v1/chat/completions` would send to the engine; `prompt` is plain text,
encoded the way `/v1/completions` encodes a text prompt when `add_special_tokens` is true (BOS).
Neither starts generation, so they stay open while the server is busy or draining.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends

from server.deps import get_state
from server.errors import BadRequest
from server.openapi import BODY_ERRORS, KEYED, errors
from server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.state import AppState, ServedModel
from tokenization import parse_messages, with_safe_prompt

logger = logging.getLogger(__name__)
router = APIRouter()


def model_named(state: AppState, name: str | None) -> ServedModel:
    """The named model (404 if unknown), or the served one when no name is given (503 while loading)."""
    return state.served() if name is None else state.resolve(name)


@router.post("/tokenize", responses=errors(*KEYED, *BODY_ERRORS, 404, 503))
async def tokenize(req: TokenizeRequest, state: Annotated[AppState, Depends(get_state)]) -> TokenizeResponse:
    """Text (`prompt`) or a chat (`messages`, with `safe_prompt`) -> the prompt ids the API would use."""
    if unknown := req.unknown_fields():
        logger.info("ignored unknown fields: %s", ", ".join(unknown[:20]))
    model = model_named(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise BadRequest("give exactly one of `prompt` and `messages`", param="prompt")
    if req.messages is not None:
        messages = parse_messages(req.messages)
        if req.safe_prompt:
            messages = with_safe_prompt(messages)
        ids = await asyncio.to_thread(model.encoder.encode_chat, messages)
    else:
        assert req.prompt is not None  # exactly one of the two, checked above
        ids = await asyncio.to_thread(model.encoder.encode_text, req.prompt, req.add_special_tokens)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=model.max_model_len)


@router.post("/detokenize", responses=errors(*KEYED, *BODY_ERRORS, 404, 503))
async def detokenize(
    req: DetokenizeRequest, state: Annotated[AppState, Depends(get_state)]
) -> DetokenizeResponse:
    """Token ids -> text (special tokens dropped, as in generated text)."""
    model = model_named(state, req.model)
    model.check_token_ids(req.tokens, param="tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(model.encoder.decode, list(req.tokens)))
