"""The contract between the server and an engine, typed, and free of torch."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

from engine.errors import EngineDeadError, RequestStoppedError
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams


class EngineClient(Protocol):
    """What the server needs of an engine: `engine.async_engine.AsyncEngine`, the
    `server.metrics.MeteredEngine` around it, or a test's fake."""

    @property
    def is_healthy(self) -> bool: ...

    @property
    def is_ready(self) -> bool: ...

    @property
    def dead_error(self) -> EngineDeadError | None:
        """Why the engine loop stopped, once it has (then every request is 503 and the process exits)."""
        ...

    @property
    def num_active_requests(self) -> int: ...

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        context_ids: Sequence[int] = (),
    ) -> AsyncGenerator[RequestOutput, None]:
        """Every choice's outputs as they come; leaving the iteration early aborts the request."""
        ...

    def abort(self, request_id: str) -> None: ...

    def stop_requests(self, error: RequestStoppedError) -> int:
        """End every request now with `error`; how many there were."""
        ...

    def stats(self) -> EngineStats: ...
