"""The FastAPI application, assembled from injected parts: `create_app(state, settings)`."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.access_log import RequestContext
from server.errors import install_error_handlers
from server.middleware import METRICS_PATHS, OPEN_PATHS, ApiKeyAuth, BodyLimit, JsonContentType, ServerErrors
from server.openapi import install_openapi
from server.protocol import ChatCompletionChunk, CompletionResponse
from server.routes import chat, completions, health, metrics, models, tokenize, ui
from server.settings import DISCARD_FACTOR, ServerSettings
from server.state import AppState


def create_app(state: AppState, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="mixtral-server", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.mixtral = state
    for module in (chat, completions, models, tokenize, health, metrics):
        app.include_router(module.router)
    open_paths = OPEN_PATHS | METRICS_PATHS if settings.open_metrics else OPEN_PATHS
    if settings.ui:
        app.include_router(ui.router)
        open_paths |= ui.UI_PATHS
    install_error_handlers(app)
    install_openapi(app, open_paths, bool(settings.api_keys), (ChatCompletionChunk, CompletionResponse))
    # Outermost last: the request id wraps everything, so even a 401, 413 or 500 carries one.
    discard = DISCARD_FACTOR * settings.max_body_bytes
    app.add_middleware(JsonContentType)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, discard_bytes=discard)
    app.add_middleware(ApiKeyAuth, keys=settings.api_keys, discard_bytes=discard, open_paths=open_paths)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_headers=["*"], allow_methods=["*"]
        )
    app.add_middleware(ServerErrors)
    app.add_middleware(RequestContext)
    return app
