"""Prometheus metrics with vLLM-like names (RELIABILITY.md item 23), recorded by wrapping the engine client.

Every route's request passes through `MeteredEngine.generate`, so time to first token,
inter-token latency, end-to-end latency, token counts and outcomes are measured in one place for
chat and text completions, streaming or not. Engine gauges (running, waiting, KV usage,
preemptions, steps) are read from `engine.stats()` at scrape time by a custom collector. Each
`Metrics` owns its registry (never the global one), so several apps can live in one process.

What is counted:
- `request_success_total{finished_reason}`: one per choice when it ends: `stop`, `length`,
  `error` (an error output, the engine raising while serving it, or a sibling choice's error that
  ended the request), `abort` (the caller left before it finished: a client disconnect),
  `queue_timeout` (not started within the bound). A
  request refused before any work (400 `RequestRejected`) is not counted at all.
- TTFT: from the call to `generate` to the first output carrying tokens; inter-token latency:
  between consecutive token-carrying outputs of the same choice; end-to-end: from the call to the
  last choice's final output (finished requests only, as vLLM).
- Prompt tokens once per request, when its first output arrives (the prompt has been computed);
  then too the prefix cache's queries (the prompt's tokens) and hits (those served from cached
  blocks), so hits / queries is the hit rate over prompt tokens, as vLLM's `prefix_cache_*`.

- Queue time (`request_queue_time_seconds`): from arrival in the engine to the request's first
  step, as the engine reports it on the first output (or to its queue timeout); batch size
  (`batch_size`): sequences per engine step, a histogram the engine keeps and the collector reads.
- `server_tasks`: asyncio tasks alive in the event loop, and the standard `process_*` metrics
  (resident memory, open file descriptors, CPU seconds): what a leak would grow.
- `engine_retried_steps_total`: steps whose batched forward failed and was retried one request at
  a time (each such step costs one forward per request): worth an alert. When two in a row find
  no failing request, the fault comes with the batch: the engine halves `max_batch_size` (a
  gauge), and 1,000 clean steps double it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.errors import EngineDeadError, QueueTimeoutError, RequestRejected, RequestStoppedError
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams
from server.engine_client import EngineClient

PREFIX = "mixtral:"
VLLM_PREFIX = "vllm:"  # the names routers read (`_RouterCollector`)
# the only values of `finished_reason`
FINISH_REASONS = ("stop", "length", "error", "abort", "queue_timeout")
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
    0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineCollector(Collector):
    """Gauges and counters the engine keeps itself, read when scraped."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        yield GaugeMetricFamily(
            PREFIX + "num_requests_running", "Sequences in the running batch", stats.num_running
        )
        yield GaugeMetricFamily(
            PREFIX + "num_requests_waiting", "Sequences waiting to run", stats.num_waiting
        )
        yield GaugeMetricFamily(
            PREFIX + "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)", stats.kv_cache_usage
        )
        yield CounterMetricFamily(PREFIX + "num_preemptions", "Sequences preempted", stats.num_preemptions)
        yield CounterMetricFamily(PREFIX + "engine_steps", "Engine iterations run", stats.num_steps)
        yield CounterMetricFamily(
            PREFIX + "engine_retried_steps",
            "Engine iterations whose batched forward failed and was retried one request at a time",
            stats.num_retried_steps,
        )
        yield GaugeMetricFamily(
            PREFIX + "max_batch_size",
            "Most sequences per step: max_num_seqs, halved each time batched forwards keep failing",
            stats.max_batch,
        )
        if stats.batch_size_buckets:
            yield HistogramMetricFamily(
                PREFIX + "batch_size",
                "Sequences per engine step",
                buckets=list(stats.batch_size_buckets),
                sum_value=stats.batch_size_sum,
            )


class _RouterCollector(Collector):
    """The series LLM-aware routers scrape, under vLLM's names (the Gateway API Inference
    Extension's model-server protocol; vLLM's production-stack router), from the same snapshot
    as ours. Each has the label `model_name`, the served model's id, and none is emitted before
    the model is loaded.
    - `vllm:num_requests_waiting`, `vllm:num_requests_running`: `mixtral:num_requests_*` (each
      choice of an `n > 1` request is a sequence of its own, as in vLLM);
    - `vllm:kv_cache_usage_perc` (0-1) and `vllm:gpu_cache_usage_perc`, the name older endpoint
      pickers read: `mixtral:kv_cache_usage_perc`;
    - `vllm:cache_config_info`, always 1, with the labels `block_size` (tokens per KV block) and
      `num_gpu_blocks` (blocks in the pool, on a CPU too), which the endpoint picker's prefix-cache
      scorer reads.
    """

    def __init__(self, stats: Callable[[], EngineStats], model_name: Callable[[], str | None]) -> None:
        self.stats = stats
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        name = self.model_name()
        if name is None:
            return
        stats = self.stats()
        for metric, doc, value in (
            ("num_requests_waiting", "Requests waiting to be processed", stats.num_waiting),
            ("num_requests_running", "Requests running on the model server", stats.num_running),
            ("kv_cache_usage_perc", "KV cache usage: 1 means 100 percent", stats.kv_cache_usage),
            (
                "gpu_cache_usage_perc",
                "KV cache usage (older name): 1 means 100 percent",
                stats.kv_cache_usage,
            ),
        ):
            family = GaugeMetricFamily(VLLM_PREFIX + metric, doc, labels=["model_name"])
            family.add_metric([name], value)
            yield family
        info = GaugeMetricFamily(
            VLLM_PREFIX + "cache_config_info",
            "The KV cache's configuration, in the labels",
            labels=["model_name", "block_size", "num_gpu_blocks"],
        )
        info.add_metric([name, str(stats.block_size), str(stats.num_blocks)], 1)
        yield info


class _EventLoopCollector(Collector):
    """Tasks alive in the server's event loop: a leak (say, of abandoned streams) shows here."""

    def collect(self) -> Iterator[Metric]:
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # scraped from outside the event loop
            return
        yield GaugeMetricFamily(PREFIX + "server_tasks", "asyncio tasks alive in the event loop", tasks)


class Metrics:
    """The metric objects of one app, in a registry of their own."""

    def __init__(
        self, stats: Callable[[], EngineStats], model_name: Callable[[], str | None] = lambda: None
    ) -> None:
        """`stats`: the engine's snapshot, read at each scrape; `model_name`: the served model's
        id once loaded (the `model_name` label of the `vllm:` series)."""
        self.registry = r = CollectorRegistry()
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=r)
        self.prefix_cache_queries = Counter(
            PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_cache_hits = Counter(
            PREFIX + "prefix_cache_hits", "Prompt tokens served from the prefix cache", registry=r
        )
        self.success = Counter(
            PREFIX + "request_success",
            "Finished choices by finish reason",
            ["finished_reason"],
            registry=r,
        )
        self.by_reason = {reason: self.success.labels(reason) for reason in FINISH_REASONS}

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=buckets, registry=r)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS)
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between consecutive tokens of a choice", ITL_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds",
            "Time from arrival to the last output of finished requests",
            E2E_BUCKETS,
        )
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time from arrival to the first step of a request", TTFT_BUCKETS
        )
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per finished request (all choices)", TOKEN_BUCKETS
        )
        r.register(_EngineCollector(stats))
        r.register(_RouterCollector(stats, model_name))
        r.register(_EventLoopCollector())
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_open_fds, ... (Linux)

    def finished(self, reason: str, count: int = 1) -> None:
        self.by_reason[reason if reason in self.by_reason else "error"].inc(count)


def _reason(out: RequestOutput) -> str:
    if out.error is not None or out.finish_reason is None:
        return "error"
    return out.finish_reason.value


class MeteredEngine:
    """An engine client, measured: the same interface (`server.engine_client.EngineClient`), every output
    recorded on its way through."""

    def __init__(self, engine: EngineClient, metrics: Metrics) -> None:
        self._engine = engine
        self.metrics = metrics

    @property
    def is_ready(self) -> bool:
        return self._engine.is_ready

    @property
    def is_healthy(self) -> bool:
        return self._engine.is_healthy

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._engine.dead_error

    @property
    def num_active_requests(self) -> int:
        return self._engine.num_active_requests

    def abort(self, request_id: str) -> None:
        self._engine.abort(request_id)

    def stop_requests(self, error: RequestStoppedError) -> int:
        return self._engine.stop_requests(error)

    def stats(self) -> EngineStats:
        return self._engine.stats()

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        context_ids: Sequence[int] = (),
    ) -> AsyncGenerator[RequestOutput, None]:
        m = self.metrics
        start = time.monotonic()
        last: dict[int, float] = {}  # choice index -> time of its last token
        remaining = params.n
        generated = 0
        first = True
        outcome = "abort"  # what unfinished choices count as if we leave early
        stream = self._engine.generate(prompt_ids, params, request_id, context_ids)
        try:
            async for out in stream:
                if out.error is not None:
                    outcome = "error"  # the caller fails the whole request: its other choices too
                now = time.monotonic()
                if first:  # the prompt has been computed
                    first = False
                    m.prompt_tokens.inc(len(prompt_ids))
                    m.prefix_cache_queries.inc(len(prompt_ids))
                    m.prefix_cache_hits.inc(out.num_cached_tokens)
                    m.request_prompt_tokens.observe(len(prompt_ids))
                    if out.queue_time is not None:
                        m.queue_time.observe(out.queue_time)
                if out.new_token_ids:
                    if not last:
                        m.ttft.observe(now - start)
                    elif out.index in last:
                        m.itl.observe(now - last[out.index])
                    last[out.index] = now
                    generated += len(out.new_token_ids)
                    m.generation_tokens.inc(len(out.new_token_ids))
                if out.finished:
                    remaining -= 1
                    m.finished(_reason(out))
                    if not remaining:
                        m.e2e.observe(now - start)
                        m.request_generation_tokens.observe(generated)
                yield out
        except RequestRejected:
            outcome = ""  # refused before any work: a 400, not a served request
            raise
        except QueueTimeoutError as exc:  # dropped before any work: a 503, counted apart
            outcome = "queue_timeout"
            if exc.waited is not None:
                m.queue_time.observe(exc.waited)
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            await stream.aclose()
            if remaining and outcome:
                m.finished(outcome, remaining)
