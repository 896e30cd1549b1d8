"""What the routes share: the served model (names, tokenizer, limits) and the engine client."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from server.engine_client import EngineClient
from server.errors import BadRequest, NotFound, Overloaded, engine_dead, not_ready
from server.metrics import Metrics
from server.protocol import ModelCapabilities, ModelCard
from tokenization.prompt_encoder import PromptEncoder


@dataclass(frozen=True)
class ServedModel:
    name: str  # the id clients see first in /v1/models
    aliases: tuple[str, ...]
    encoder: PromptEncoder
    max_model_len: int
    default_temperature: float
    description: str
    created: int = field(default_factory=lambda: int(time.time()))

    def check_token_ids(self, ids: Sequence[int], param: str) -> None:
        """400 naming the first id outside [0, vocab_size)."""
        vocab = self.encoder.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise BadRequest(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param=param)

    def card(self) -> ModelCard:
        return ModelCard(
            id=self.name,
            created=self.created,
            name=self.name,
            description=self.description,
            max_context_length=self.max_model_len,
            aliases=list(self.aliases),
            default_model_temperature=self.default_temperature,
            capabilities=ModelCapabilities(function_calling=self.encoder.tool_calls_id is not None),
        )


class Admission:
    """The bound on requests in flight (running + waiting, API.md's 429).

    A slot is taken in the same event-loop step as the check, before any await, so a burst of
    requests cannot all pass the check before the first of them reaches the engine. It is held
    until the response, streamed or not, has been sent.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.in_flight >= self.limit:
            raise Overloaded(f"Too many requests in flight ({self.limit}); retry shortly")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


@dataclass
class AppState:
    engine: EngineClient
    admission: Admission = field(default_factory=lambda: Admission(1 << 30))
    # None until the engine is ready: the context length comes from the KV pool it sized.
    model: ServedModel | None = None
    shutting_down: bool = False
    metrics: Metrics | None = None  # /metrics serves its registry; None: no metrics
    # Seconds a stream's client may read nothing before the stream is aborted
    # (ServerSettings.stream_stall_timeout_s); None: no limit (tests that build the app directly).
    stall_timeout_s: float | None = None
    stop_server: Callable[[], None] = lambda: None  # set by the CLI: ends the process (engine died)

    @property
    def is_ready(self) -> bool:
        return self.model is not None and self.engine.is_ready

    def served(self) -> ServedModel:
        """The served model; 503 `not_ready` while it loads, `engine_dead` once the engine died."""
        if self.engine.dead_error is not None:
            raise engine_dead()
        if self.model is None or not self.engine.is_ready:
            raise not_ready()
        return self.model

    def resolve(self, name: str) -> ServedModel:
        """The served model for a name or alias; 404 `model_not_found` otherwise."""
        model = self.served()
        if name == model.name or name in model.aliases:
            return model
        raise NotFound(f"The model `{name[:100]}` does not exist", param="model", code="model_not_found")
