"""The engine's typed errors: what callers (the server) map to responses. Plain Python, no torch."""

from __future__ import annotations

from typing import Literal

# Why a request failed: its forward or post-processing raised; it kept running out of device
# memory (worth retrying later); it waited too long for a slot and was never started.
ErrorCode = Literal["internal_error", "out_of_memory", "queue_timeout"]


class EngineError(RuntimeError):
    """Base of the engine's typed errors."""


class RequestRejected(EngineError, ValueError):
    """A request the engine can never serve (too long for the context or the KV pool, or a
    `response_format` it cannot enforce); `param` names the request field at fault."""

    def __init__(self, message: str, code: str, param: str = "messages") -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class EngineDeadError(EngineError):
    """The engine loop stopped; no request can be served until the process restarts."""


class QueueTimeoutError(EngineError):
    """The request waited longer than the configured bound and was dropped before any work."""

    def __init__(self, message: str, waited: float | None = None) -> None:
        super().__init__(message)
        self.waited = waited  # seconds it spent in the queue


class RequestFailedError(EngineError):
    """Serving one request failed (the engine goes on serving the others)."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code


class RequestStoppedError(EngineError):
    """The request was ended from outside before it finished (the server stopped: it outlasted
    the drain timeout)."""


class SlowConsumerError(EngineError):
    """The caller left more of a request's outputs unread than the bound allows: the request was
    aborted (a client that stopped reading its stream)."""


class EngineNotReadyError(EngineError):
    """The engine is still loading weights or warming up."""


class RankFailure(EngineError):
    """A rank of a tensor- or expert-parallel engine failed, or stopped answering: the ranks are
    out of step, so the engine cannot go on (it dies, and the server exits non-zero)."""
