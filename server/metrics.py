"""Prometheus metrics with vLLM-like names, recorded by wrapping the engine client.

Every route's request passes through `MeteredEngine.generate`, so time to first token,
inter-token latency, end-to-end latency, token counts and outcomes are measured in one place;
engine gauges (running, waiting, KV usage, preemptions) are read at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

_PREFIX = "mixtral:"
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)
_FINISH_REASONS = ("stop", "length", "error", "abort")


class _EngineCollector(Collector):
    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats() if hasattr(self.engine, "stats") else None
        if stats is None:
            return
        yield GaugeMetricFamily(
            _PREFIX + "num_requests_running", "Sequences in the running batch", stats.num_running
        )
        yield GaugeMetricFamily(
            _PREFIX + "num_requests_waiting", "Sequences waiting to run", stats.num_waiting
        )
        yield GaugeMetricFamily(
            _PREFIX + "kv_cache_usage_perc", "Fraction of KV blocks in use", stats.kv_cache_usage
        )
        yield CounterMetricFamily(_PREFIX + "num_preemptions", "Sequences preempted", stats.num_preemptions)
        yield CounterMetricFamily(_PREFIX + "engine_steps", "Engine iterations run", stats.num_steps)


class Metrics:
    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter(_PREFIX + "prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(_PREFIX + "generation_tokens", "Tokens generated", registry=r)
        self.success = Counter(
            _PREFIX + "request_success", "Finished sequences by reason", ["finished_reason"], registry=r
        )
        for reason in _FINISH_REASONS:
            self.success.labels(reason)
        self.ttft = Histogram(
            _PREFIX + "time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            _PREFIX + "inter_token_latency_seconds",
            "Time between tokens",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            _PREFIX + "e2e_request_latency_seconds", "Request latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        r.register(_EngineCollector(engine))


class MeteredEngine:
    """The engine client, measured: same interface, every output recorded."""

    def __init__(self, engine, metrics: Metrics) -> None:
        self._engine = engine
        self.metrics = metrics

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    @property
    def is_ready(self) -> bool:
        return self._engine.is_ready

    @property
    def is_healthy(self) -> bool:
        return self._engine.is_healthy

    @property
    def num_active_requests(self) -> int:
        return self._engine.num_active_requests

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, context_ids: list[int] = ()
    ) -> AsyncIterator[RequestOutput]:
        m = self.metrics
        start = last = time.monotonic()
        first = True
        remaining = params.n
        stream = self._engine.generate(prompt_ids, params, request_id, context_ids)
        try:
            async for out in stream:
                now = time.monotonic()
                if out.new_token_ids:
                    (m.ttft if first else m.itl).observe(now - (start if first else last))
                    first, last = False, now
                    m.generation_tokens.inc(len(out.new_token_ids))
                if out.finished:
                    remaining -= 1
                    reason = (
                        "error" if out.error else (out.finish_reason.value if out.finish_reason else "error")
                    )
                    m.success.labels(reason if reason in _FINISH_REASONS else "error").inc()
                yield out
        finally:
            await stream.aclose()
            m.prompt_tokens.inc(len(prompt_ids))
            if remaining:
                m.success.labels("abort").inc(remaining)
            m.e2e.observe(time.monotonic() - start)
