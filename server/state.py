"""What the routes share: the served model (names, tokenizer, limits) and the engine client."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from engine.sampling_params import SamplingParams
from server.errors import NotFound
from server.protocol import ModelCapabilities, ModelCard
from tokenization.prompt_encoder import PromptEncoder


class EngineClient(Protocol):
    """The part of `engine.async_engine.AsyncEngine` the server uses (tests may pass a fake)."""

    @property
    def is_healthy(self) -> bool: ...

    @property
    def is_ready(self) -> bool: ...

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, context_ids: list[int] = ...
    ):
        """An async iterator of `RequestOutput`."""
        ...

    def abort(self, request_id: str) -> None: ...

    @property
    def num_active_requests(self) -> int: ...


@dataclass(frozen=True)
class ServedModel:
    name: str  # the id clients see first in /v1/models
    aliases: tuple[str, ...]
    encoder: PromptEncoder
    max_model_len: int
    default_temperature: float
    description: str
    created: int = field(default_factory=lambda: int(time.time()))

    def card(self) -> ModelCard:
        return ModelCard(
            id=self.name,
            created=self.created,
            name=self.name,
            description=self.description,
            max_context_length=self.max_model_len,
            aliases=list(self.aliases),
            default_model_temperature=self.default_temperature,
            capabilities=ModelCapabilities(function_calling=self.encoder.supports_tools),
        )


@dataclass
class AppState:
    model: ServedModel
    engine: EngineClient
    max_active_requests: int = 1 << 30  # running + waiting; beyond it, 429
    shutting_down: bool = False
    stop_server: Callable[[], None] = lambda: None  # set by the CLI: ends the process (engine died)

    def resolve(self, name: str) -> ServedModel:
        """The served model for a name or alias; 404 `model_not_found` otherwise."""
        if name == self.model.name or name in self.model.aliases:
            return self.model
        raise NotFound(f"The model `{name[:100]}` does not exist", param="model", code="model_not_found")
