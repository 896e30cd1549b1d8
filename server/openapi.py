"""The OpenAPI description (`/openapi.json`) says what each route really answers: its response
model, its streams (`text/event-stream`), every error status it may return with the error body,
and the bearer key. Schemathesis checks the server against it (tests/server/test_schemathesis.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.protocol import ErrorResponse

_WHY = {
    400: "A bad value or conversation, a body that is not JSON, or a prompt too long for the context",
    401: "A missing or wrong API key",
    404: "An unknown model",
    413: "A body over max_body_bytes",
    415: "A body that is not JSON",
    422: "A body of the wrong shape (FastAPI's `detail` names the fields)",
    429: "Too many requests in flight (with Retry-After)",
    503: "Not ready yet, shutting down, a queue timeout, or out of device memory (with Retry-After)",
}
# What every POST body may meet in the middleware, and every keyed route.
BODY_ERRORS = (400, 413, 415, 422)
KEYED = (401,)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses` for these error statuses, each with the error body."""
    return {status: {"model": ErrorResponse, "description": _WHY[status]} for status in statuses}


GENERATION_ERRORS = errors(*KEYED, *BODY_ERRORS, 404, 429, 503)  # chat and text completions


def streamed_or_json(description: str, chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The 200 of a route that streams when asked (`stream: true`) as well as answering JSON: each
    event's `data` is a `chunk` as JSON, or the closing `[DONE]` (`itemSchema`, as OpenAPI 3.2
    describes a stream's events; `install_openapi` adds the chunk's schema)."""
    json_chunk = {"contentMediaType": "application/json", "contentSchema": {"$ref": _ref(chunk)}}
    data = {"anyOf": [{"const": "[DONE]"}, {"type": "string", **json_chunk}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {200: {"content": {"text/event-stream": {"itemSchema": event}}, "description": description}}


def _ref(model: type[BaseModel]) -> str:
    return f"#/components/schemas/{model.__name__}"


def install_openapi(
    app: FastAPI, open_paths: frozenset[str], keyed: bool, stream_chunks: tuple[type[BaseModel], ...]
) -> None:
    """Generate the schema once, with the models of the streams' chunks, and the bearer scheme on
    every route but `open_paths` when keys are configured."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, openapi_version=app.openapi_version, routes=app.routes
            )
            pairs = [(model, "serialization") for model in stream_chunks]
            _, defs = models_json_schema(pairs, ref_template="#/components/schemas/{model}")  # type: ignore[arg-type]
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            if keyed:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}
                }
                for path, operations in schema["paths"].items():
                    if path not in open_paths:
                        for operation in operations.values():
                            operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
