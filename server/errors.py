"""Typed API errors and the one place that turns every failure into a status code and a short body.

Body: `{"error": {"message", "type", "param", "code"}}` (what `openai` reads); validation errors
also carry FastAPI's `detail` list (what the Mistral SDKs model). Messages are capped so a huge
bad field never makes a huge response, and nothing internal (tracebacks, paths) leaks out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import (
    EngineDeadError,
    EngineNotReadyError,
    QueueTimeoutError,
    RequestFailedError,
    RequestRejected,
    RequestStoppedError,
    SlowConsumerError,
)
from engine.sampling_params import InvalidSamplingParams
from server.protocol import INVALID_UNICODE
from tokenization.errors import InvalidConversationError

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 500
MAX_PARAM_CHARS = 200
# Fields whose wrong type is a bad value (400, RELIABILITY.md item 8) rather than a bad shape (422).
SCALAR_PARAMS = frozenset(
    {
        "max_tokens", "max_completion_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p",
        "presence_penalty", "frequency_penalty", "repetition_penalty", "n", "random_seed", "seed",
        "top_logprobs", "logprobs", "best_of",
    }
)  # fmt: skip


class APIError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers: dict[str, str] = {}


class BadRequest(APIError):
    pass


class NotFound(APIError):
    status = 404
    type = "not_found_error"


class InternalError(APIError):
    status = 500
    type = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="internal_error")


class ServiceUnavailable(APIError):
    status = 503
    type = "service_unavailable"

    def __init__(self, message: str, code: str, retry_after: int = 5) -> None:
        super().__init__(message, code=code)
        self.headers = {"Retry-After": str(retry_after)}


class Overloaded(APIError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, code="overloaded")
        self.headers = {"Retry-After": str(retry_after)}


def not_ready() -> ServiceUnavailable:
    return ServiceUnavailable("The model is still loading", "not_ready")


def engine_dead() -> ServiceUnavailable:
    return ServiceUnavailable("The engine stopped; the server is restarting", "engine_dead")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    # A message that quotes a bad field could hold a lone surrogate, which UTF-8 cannot encode.
    message = message.encode("utf-8", "replace").decode("utf-8")
    if param is not None and len(param) > MAX_PARAM_CHARS:  # a path through a huge key
        param = param[: MAX_PARAM_CHARS - 3] + "..."
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _conversation(exc: InvalidConversationError) -> APIError:
    param = "messages" if exc.index is None else f"messages[{exc.index}]"
    return BadRequest(str(exc), param=param, code="invalid_conversation")


def _failed(exc: RequestFailedError) -> APIError:
    logger.warning("request failed in the engine (%s): %s", exc.code, exc)
    if exc.code == "out_of_memory":
        return ServiceUnavailable(
            "The server ran out of accelerator memory serving this request; retry later", "out_of_memory"
        )
    return InternalError("Generating the completion failed; the cause is in the server's log")


# Every expected failure, by class, and its API error. Each class gets a handler of its own:
# Starlette routes anything that only the `Exception` handler catches to ServerErrorMiddleware,
# which re-raises it after answering, so uvicorn logs a traceback and closes the connection.
EXPECTED_ERRORS: dict[type[Exception], Callable[[Any], APIError]] = {
    APIError: lambda exc: exc,
    InvalidSamplingParams: lambda exc: BadRequest(str(exc), param=exc.param, code="invalid_value"),
    InvalidConversationError: _conversation,
    RequestRejected: lambda exc: BadRequest(str(exc), param=exc.param, code=exc.code),
    EngineDeadError: lambda exc: engine_dead(),
    QueueTimeoutError: lambda exc: ServiceUnavailable(str(exc), "queue_timeout", retry_after=5),
    EngineNotReadyError: lambda exc: not_ready(),
    RequestStoppedError: lambda exc: ServiceUnavailable(
        "The server stopped before the request finished", "shutting_down"
    ),
    RequestFailedError: _failed,
    SlowConsumerError: lambda exc: ServiceUnavailable(
        "The client read too slowly; the request was stopped", "slow_consumer"
    ),
}


def to_api_error(exc: Exception) -> APIError:
    """The API error of an expected failure: the most specific class in `EXPECTED_ERRORS`."""
    for cls in type(exc).__mro__:
        if cls in EXPECTED_ERRORS:
            return EXPECTED_ERRORS[cls](exc)
    raise TypeError(f"{type(exc).__name__} is not an expected error") from exc


def api_error_response(exc: Exception) -> JSONResponse:
    err = to_api_error(exc)
    return JSONResponse(
        error_body(err.message, err.type, err.param, err.code), err.status, headers=err.headers
    )


INTERNAL_ERROR_BODY = error_body("Internal server error", InternalError.type, None, "internal_error")


# The member of a union that pydantic names in an error's location (`stop.str`): not a field.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def field_path(loc: Sequence[Any]) -> str:
    """`messages.0.content` as a client names it, without union members: `stop`, not `stop.str`."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p)))


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    detail: list[dict[str, Any]] = [
        {"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:200]}
        for e in exc.errors()[:10]
    ]
    fields = [e["loc"][1] for e in detail if len(e["loc"]) > 1 and e["loc"][0] == "body"]
    first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
    param: str | None = field_path(first["loc"][1:]) or None
    unparsable = any(e["type"] == "json_invalid" or e["loc"] == ["body"] for e in detail)
    status = 400 if unparsable or (fields and all(f in SCALAR_PARAMS for f in fields)) else 422
    message = f"{param or 'body'}: {first['msg']}"
    if first.get("type") == "json_invalid":  # its loc is the byte offset, not a field
        param, message = None, "Request body is not valid JSON"
    elif first.get("type") == INVALID_UNICODE:  # found by the model, which names the field
        param, message = str(exc.errors()[0]["ctx"]["param"]), str(first["msg"])
    body = error_body(message, "invalid_request_error", param, "invalid_value")
    body["detail"] = detail
    return JSONResponse(body, status)


def install_error_handlers(app: FastAPI) -> None:
    """One handler per expected class; a bug meets `server.middleware.ServerErrors` instead."""

    async def expected(request: Request, exc: Exception) -> JSONResponse:
        return api_error_response(exc)

    for cls in EXPECTED_ERRORS:
        app.add_exception_handler(cls, expected)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), exc.status_code, headers=exc.headers)
