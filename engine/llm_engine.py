"""The synchronous engine core: requests in, per-step outputs out. One thread drives it.

A step reads schedule -> execute -> update -> process:
- the scheduler picks what each sequence computes (`engine.scheduler`);
- the model runner runs one forward over all of it and samples (`engine.runner`), with the
  fault policy around it, so a failure while serving one request fails that request only
  (`engine.fault_policy`);
- the scheduler takes the sampled tokens and applies token-level stops;
- the output processor detokenizes, finds stop strings, advances grammars and builds each
  sequence's output (`engine.output_processor`), guarded per request.

A request with structured output (`SamplingParams.structured`) carries a compiled grammar
(`engine.structured`); before the runner samples, the output processor gives it the masks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import torch

from engine.config import EngineConfig
from engine.errors import ErrorCode, RequestRejected
from engine.fault_policy import FaultPolicy
from engine.output_processor import OutputProcessor, TextDecoder
from engine.outputs import RequestOutput, StepHistogram
from engine.request import FinishReason, Request
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.structured import CompiledGrammar, GrammarCompiler, InvalidStructuredOutput
from engine.workers import WorkerGroup
from model.mixtral import MixtralModel

logger = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        model: MixtralModel,
        config: EngineConfig,
        decoder: TextDecoder,
        eos_token_id: int | None,
        seed: int = 0,
        grammars: GrammarCompiler | None = None,
        workers: WorkerGroup | None = None,
    ) -> None:
        """`grammars` compiles structured-output specs for this model's vocabulary (None: a
        request with `structured` is rejected). `workers`: the other ranks, when `model` is rank
        0's share of a tensor- or expert-parallel model; the engine owns them (`close`)."""
        self.config = config
        self.eos_token_id = eos_token_id
        self.grammars = grammars
        self.scheduler = Scheduler(config)
        self.output_processor = OutputProcessor(
            decoder, self.scheduler.finish, grammars.mask_words if grammars is not None else 0
        )
        self.workers = workers
        self.runner = ModelRunner(model, config, seed, self.output_processor.grammar_bitmask, workers)
        self.faults = FaultPolicy(
            self.runner, self.scheduler, config, self._fail, self.output_processor.restart_prompt_logprobs
        )
        self.num_steps = 0
        self.batch_sizes = StepHistogram()  # sequences per step

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def check_ranks(self) -> None:
        """Raise `RankFailure` once a worker rank has exited (checked while idle, too)."""
        if self.workers is not None:
            self.workers.check()

    def close(self, failed: bool = False) -> None:
        """Stop the worker ranks, if any (`failed`: the engine died, so do not wait long for them)."""
        if self.workers is not None:
            self.workers.close(failed)

    @property
    def num_retried_steps(self) -> int:
        """Steps whose forward failed and was retried one request at a time."""
        return self.faults.num_retried_steps

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise `RequestRejected` for a request that can never be served. Touches no state."""
        n, limit, total = len(prompt_ids), self.config.max_model_len, len(prompt_ids) + params.max_tokens
        if n == 0:
            raise RequestRejected("the prompt is empty", "empty_prompt")
        if total > limit:
            raise RequestRejected(
                f"This model's maximum context length is {limit} tokens. However, you requested {total} "
                f"tokens ({n} in the messages, {params.max_tokens} in the completion).",
                "context_length_exceeded",
            )
        capacity = self.config.kv_capacity_tokens
        if total > capacity:
            raise RequestRejected(
                f"{total} tokens can never fit the KV cache ({capacity} tokens)", "kv_cache_too_small"
            )
        if params.structured is not None and self.grammars is None:
            raise InvalidStructuredOutput("this engine has no grammar backend", "response_format")

    def add_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        context_ids: Sequence[int] = (),
        arrival_time: float | None = None,
        grammar: CompiledGrammar | None = None,
    ) -> None:
        """Queue a request; `context_ids` seed detokenization (a `prefix` the reply continues).

        A structured request's `grammar` is compiled here when not given (the async facade
        compiles it off this thread first); `InvalidStructuredOutput` when it cannot be.
        """
        self.validate(prompt_ids, params)
        if request_id in self.output_processor:
            raise RequestRejected(f"request id {request_id!r} is already in use", "duplicate_request_id")
        if params.structured is not None and grammar is None:
            assert self.grammars is not None  # validate() refused it otherwise
            grammar = self.grammars.get(params.structured)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        choices: list[Request] = []
        for i in range(params.n):
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(
                rid, list(prompt_ids), params, self.eos_token_id, self.config.max_model_len, arrival, i
            )
            req.parent_id = request_id
            if i > 0 and self.config.enable_prefix_caching:
                req.wait_for = choices[0]
            choices.append(req)
        self.output_processor.add(request_id, choices, context_ids, grammar)
        for req in choices:
            self.scheduler.add(req)

    def abort(self, request_id: str) -> None:
        """Stop a request's choices now; their KV blocks are free when this returns."""
        for req in self.output_processor.drop(request_id):
            self.scheduler.finish(req, FinishReason.ABORT)
            self.runner.release(req.request_id)

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the outputs it produced (at most one per running choice)."""
        outputs = self._expire_overdue()
        sched = self.scheduler.schedule()
        if not sched.chunks:
            return outputs
        self.num_steps += 1
        self.batch_sizes.observe(len(sched.chunks))
        self.output_processor.restart_prompt_logprobs(sched.preempted)
        result = self.faults.execute(sched)
        self.scheduler.update(result.ran, result.run.sampled)
        outputs += result.failed
        for chunk in result.ran.chunks:
            req = chunk.request
            try:
                out = self.output_processor.process(req, result.run)
            except Exception as exc:
                logger.exception("post-processing request %s failed", req.request_id)
                out = self._fail(req, exc)
            if out is not None:
                outputs.append(self._settled(req, out))
        return outputs

    def _expire_overdue(self) -> list[RequestOutput]:
        """Drop requests that waited past `max_queue_time_s` with none of their choices started."""
        bound = self.config.max_queue_time_s
        if not bound or not self.scheduler.waiting:  # 0: no bound
            return []
        outputs = []
        now = time.monotonic()
        for late in self.scheduler.overdue(now, bound):
            choices = self.output_processor.choices(late.parent_id or late.request_id) or [late]
            if any(c.first_scheduled_time is not None for c in choices):
                continue  # a sibling has started: the request is being served
            for req in choices:
                if req.is_finished:
                    continue
                self.scheduler.finish(req, FinishReason.QUEUE_TIMEOUT)
                error = f"the request waited more than {bound:g} s for a slot and was not started"
                out = self.output_processor.output(req, (), "", (), error=error, error_code="queue_timeout")
                outputs.append(
                    dataclasses.replace(self._settled(req, out), queue_time=now - req.arrival_time)
                )
        return outputs

    def _fail(self, req: Request, exc: BaseException) -> RequestOutput:
        self.scheduler.finish(req, FinishReason.ERROR)
        code: ErrorCode = (
            "out_of_memory" if isinstance(exc, torch.cuda.OutOfMemoryError) else "internal_error"
        )
        out = self.output_processor.output(
            req, (), "", (), error=f"{type(exc).__name__}: {exc}"[:500], error_code=code
        )
        return self._settled(req, out)

    def _settled(self, req: Request, out: RequestOutput) -> RequestOutput:
        """`out`, once a finished sequence's per-request state in the runner is let go."""
        if out.finished:
            self.runner.release(req.request_id)
        return out
