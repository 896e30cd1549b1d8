"""The synchronous engine core: requests in, per-step outputs out. One thread drives it.

A step schedules, runs the model, applies token-level stops, then detokenizes each sequence's
new token and checks its stop strings. A failure while serving one request fails that request
only: post-processing is guarded per request, and a forward that fails over several requests is
retried one request at a time to find the one that breaks it. The engine keeps serving the rest.
A fault that comes with the batch size instead (every request runs alone) halves the requests per
step once it repeats.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections.abc import Sequence
from typing import Protocol

import torch

from engine.config import EngineConfig
from engine.errors import ErrorCode, RequestRejected
from engine.outputs import Logprob, RequestOutput, StepHistogram, TopLogprob
from engine.request import FinishReason, Request
from engine.runner import ModelRunner, RunnerOutput
from engine.sampler import TokenLogprob
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from model.mixtral import MixtralModel
from tokenization.detokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

# A request whose steps ran out of device memory this many times fails instead of being retried.
MAX_OOM_RETRIES = 2
# Consecutive steps whose batched forward failed while each request ran alone, before the engine
# halves the number of requests per step; clean steps after which a lowered cap doubles again.
BATCH_FAULTS_BEFORE_SHRINK = 2
STEPS_BEFORE_REGROW = 1000
_NOTHING_RAN = SchedulerOutput((), ())


class TextDecoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


class Engine:
    def __init__(
        self,
        model: MixtralModel,
        config: EngineConfig,
        decoder: TextDecoder,
        eos_token_id: int | None,
        seed: int = 0,
    ) -> None:
        self.config = config
        self.decoder = decoder
        self.eos_token_id = eos_token_id
        self.scheduler = Scheduler(config)
        self.runner = ModelRunner(model, config, seed)
        self._choices: dict[str, list[Request]] = {}  # client request id -> its choices
        self._detok: dict[str, IncrementalDetokenizer] = {}  # internal id -> detokenizer
        self._prompt_logprobs: dict[str, list[Logprob | None]] = {}
        self.num_steps = 0
        self.num_retried_steps = 0  # steps whose forward failed and was retried one request at a time
        self._batch_faults = 0  # consecutive retried steps in which every request ran alone
        self._clean_steps = 0  # steps run whole since the batch cap was last lowered
        self.batch_sizes = StepHistogram()  # sequences per step

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

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

    def add_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        context_ids: Sequence[int] = (),
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request; `context_ids` seed detokenization (a `prefix` the reply continues)."""
        self.validate(prompt_ids, params)
        if request_id in self._choices:
            raise RequestRejected(f"request id {request_id!r} is already in use", "duplicate_request_id")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        choices = []
        for i in range(params.n):
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(
                rid, list(prompt_ids), params, self.eos_token_id, self.config.max_model_len, arrival, i
            )
            req.parent_id = request_id
            if i > 0 and self.config.enable_prefix_caching:
                req.wait_for = choices[0]
            self._detok[rid] = IncrementalDetokenizer(self.decoder.decode, context_ids, params.stop)
            choices.append(req)
            self.scheduler.add(req)
        self._choices[request_id] = choices

    def abort(self, request_id: str) -> None:
        """Stop a request's choices now; their KV blocks are free when this returns."""
        for req in self._choices.pop(request_id, []):
            self.scheduler.finish(req, FinishReason.ABORT)
            self._forget(req)

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the outputs it produced (at most one per running choice)."""
        expired = self._expire_overdue()
        sched = self.scheduler.schedule()
        if not sched.chunks:
            return expired
        self.num_steps += 1
        self.batch_sizes.observe(len(sched.chunks))
        self._restart_prompt_logprobs(sched.preempted)
        ran, run, failed = self._execute(sched)
        self.scheduler.update(ran, run.sampled)
        outputs = expired + failed
        for chunk in ran.chunks:
            try:
                out = self._postprocess(chunk, run)
            except Exception as exc:
                logger.exception("post-processing request %s failed", chunk.request.request_id)
                out = self._fail(chunk.request, exc)
            if out is not None:
                outputs.append(out)
        return outputs

    def _execute(
        self, sched: SchedulerOutput, alone: bool = False
    ) -> tuple[SchedulerOutput, RunnerOutput, list[RequestOutput]]:
        """Run the step's forward: (the part of the step that ran, what it produced, outputs of
        the requests it failed).

        A forward over several requests that fails is retried one request at a time, so a
        request that breaks the forward, or that runs out of device memory even alone, is found
        and dealt with alone: the others go on (their KV slots are simply written again; seeded
        generators were restored by the runner). Alone, a failure fails the request; running
        out of memory requeues it (see `_after_out_of_memory`).
        """
        try:
            run = self.runner.execute(sched)
        except torch.cuda.OutOfMemoryError as exc:
            traceback.clear_frames(exc.__traceback__)  # let the failed step's tensors go
            if len(sched.chunks) == 1:
                return _NOTHING_RAN, RunnerOutput({}, {}, {}), self._after_out_of_memory(sched.chunks[0], exc)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            error: Exception = exc
        except Exception as exc:
            if len(sched.chunks) == 1:
                request = sched.chunks[0].request
                logger.exception("model step failed; failing request %s", request.request_id)
                return _NOTHING_RAN, RunnerOutput({}, {}, {}), [self._fail(request, exc)]
            traceback.clear_frames(exc.__traceback__)
            error = exc
        else:
            if not alone:  # a whole step ran
                self._after_clean_step()
            return sched, run, []
        self.num_retried_steps += 1
        logger.warning(
            "model step of %d requests failed (%s: %s); retrying each alone",
            len(sched.chunks), type(error).__name__, error,
        )  # fmt: skip
        ran: list[ScheduledChunk] = []
        merged = RunnerOutput({}, {}, {})
        failed: list[RequestOutput] = []
        for chunk in sched.chunks:
            one, run, fails = self._execute(SchedulerOutput((chunk,), ()), alone=True)
            ran += one.chunks
            merged.sampled.update(run.sampled)
            merged.logprobs.update(run.logprobs)
            merged.prompt_logprobs.update(run.prompt_logprobs)
            failed += fails
        if len(ran) == len(sched.chunks):  # each request ran alone: the batch broke the forward
            self._note_batch_fault(len(sched.chunks), error)
        else:
            self._batch_faults = 0
        return SchedulerOutput(tuple(ran), sched.preempted), merged, failed

    def _note_batch_fault(self, size: int, error: Exception) -> None:
        """A forward of `size` requests failed, yet each of them ran alone. Once may be a passing
        glitch; BATCH_FAULTS_BEFORE_SHRINK steps in a row, the fault comes with the batch (a kernel
        variant broken at some size, memory short at that size), and retrying every step one
        request at a time would cost a forward per request for good: halve the requests per
        step instead. Requests running beyond the new cap are requeued (their KV freed, to be
        recomputed when they are admitted again) rather than left holding blocks without steps."""
        self._batch_faults += 1
        self._clean_steps = 0
        if self._batch_faults < BATCH_FAULTS_BEFORE_SHRINK:
            return
        self._batch_faults = 0
        cap = max(1, self.scheduler.max_batch // 2)
        logger.error(
            "forwards of %d requests keep failing (%s) though each request runs alone: "
            "at most %d requests per step (was %d) until %d clean steps",
            size, type(error).__name__, cap, self.scheduler.max_batch, STEPS_BEFORE_REGROW,
        )  # fmt: skip
        self._restart_prompt_logprobs(self.scheduler.set_max_batch(cap))

    def _after_clean_step(self) -> None:
        """A step's forward ran: the run of batch faults is broken, and after STEPS_BEFORE_REGROW
        clean steps a lowered cap doubles again (up to max_num_seqs)."""
        self._batch_faults = 0
        if self.scheduler.max_batch >= self.config.max_num_seqs:
            return
        self._clean_steps += 1
        if self._clean_steps >= STEPS_BEFORE_REGROW:
            self._clean_steps = 0
            cap = min(self.config.max_num_seqs, 2 * self.scheduler.max_batch)
            logger.warning("%d clean steps: at most %d requests per step again", STEPS_BEFORE_REGROW, cap)
            self.scheduler.set_max_batch(cap)

    def _expire_overdue(self) -> list[RequestOutput]:
        """Drop requests that waited past `max_queue_time_s` with none of their choices started."""
        bound = self.config.max_queue_time_s
        if not bound or not self.scheduler.waiting:  # 0: no bound
            return []
        outputs = []
        now = time.monotonic()
        for late in self.scheduler.overdue(now, bound):
            choices = self._choices.get(late.parent_id or late.request_id, [late])
            if any(c.first_scheduled_time is not None for c in choices):
                continue  # a sibling has started: the request is being served
            for req in choices:
                if req.is_finished:
                    continue
                self.scheduler.finish(req, FinishReason.QUEUE_TIMEOUT)
                error = f"the request waited more than {bound:g} s for a slot and was not started"
                out = self._output(req, (), "", (), error=error, error_code="queue_timeout")
                outputs.append(dataclasses.replace(out, queue_time=now - req.arrival_time))
        return outputs

    def _restart_prompt_logprobs(self, requests: Sequence[Request]) -> None:
        """Preempted before their first token: their prompt is recomputed from the start, and so
        are its logprobs; drop the entries gathered so far."""
        for req in requests:
            if req.num_output_tokens == 0:
                self._prompt_logprobs.pop(req.request_id, None)

    def _after_out_of_memory(
        self, chunk: ScheduledChunk, exc: torch.cuda.OutOfMemoryError
    ) -> list[RequestOutput]:
        """Out of device memory in a forward of one request (a batched forward that runs out is
        retried request by request first): give the allocator's cache back and requeue the
        request (its KV is dropped and recomputed later, as after a preemption, so the output is
        the same). After MAX_OOM_RETRIES it fails instead, so one request too large for the
        memory left cannot stall the server."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        request = chunk.request
        if request.is_finished:  # aborted while the step ran
            return []
        request.num_oom_retries += 1
        if request.num_oom_retries > MAX_OOM_RETRIES:
            logger.warning("request %s ran out of device memory again: failing it", request.request_id)
            return [self._fail(request, exc)]
        logger.warning("request %s ran out of device memory: requeued", request.request_id)
        self.scheduler.requeue([request])
        self._restart_prompt_logprobs([request])
        return []

    def _postprocess(self, chunk: ScheduledChunk, run: RunnerOutput) -> RequestOutput | None:
        req = chunk.request
        if req.request_id not in self._detok:  # aborted while the step ran
            return None
        if req.request_id in run.prompt_logprobs:
            entries = [self._logprob(e) for e in run.prompt_logprobs[req.request_id]]
            self._prompt_logprobs.setdefault(req.request_id, [None]).extend(entries)
        if req.request_id not in run.sampled:
            return None  # a prefill chunk that did not reach the end of the prompt
        token = req.token_ids[-1]
        detok = self._detok[req.request_id]
        text = detok.add([token])
        if text.stop_string is not None:
            self.scheduler.finish(req, FinishReason.STOP)
            req.stop_reason = text.stop_string
        new_text = text.text + (detok.finish().text if req.is_finished else "")
        logprob = run.logprobs.get(req.request_id)
        return self._output(req, (token,), new_text, (self._logprob(logprob),) if logprob else ())

    def _output(
        self,
        req: Request,
        tokens: tuple[int, ...],
        text: str,
        logprobs: tuple[Logprob, ...],
        error: str | None = None,
        error_code: ErrorCode | None = None,
    ) -> RequestOutput:
        prompt_lp = None
        if req.params.prompt_logprobs is not None and req.num_output_tokens <= 1:
            prompt_lp = tuple(self._prompt_logprobs.pop(req.request_id, [None]))
        out = RequestOutput(
            request_id=req.parent_id or req.request_id,
            index=req.index,
            new_token_ids=tokens,
            new_text=text,
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_lp,
            error=error,
            error_code=error_code,
            queue_time=None
            if req.first_scheduled_time is None
            else req.first_scheduled_time - req.arrival_time,
        )
        if req.is_finished:
            self._forget(req)
        return out

    def _fail(self, req: Request, exc: BaseException) -> RequestOutput:
        self.scheduler.finish(req, FinishReason.ERROR)
        code = "out_of_memory" if isinstance(exc, torch.cuda.OutOfMemoryError) else "internal_error"
        return self._output(req, (), "", (), error=f"{type(exc).__name__}: {exc}"[:500], error_code=code)

    def _forget(self, req: Request) -> None:
        self.runner.release(req.request_id)
        self._detok.pop(req.request_id, None)
        self._prompt_logprobs.pop(req.request_id, None)
        parent = req.parent_id or req.request_id
        choices = self._choices.get(parent)
        if choices is not None and all(c.request_id not in self._detok for c in choices):
            del self._choices[parent]  # every choice has delivered its last output

    def _logprob(self, entry: TokenLogprob) -> Logprob:
        raw = self.decoder.token_bytes(entry.token_id)
        top = tuple(
            TopLogprob(t, (b := self.decoder.token_bytes(t)).decode("utf-8", "replace"), tuple(b), lp)
            for t, lp in entry.top
        )
        return Logprob(
            entry.token_id, raw.decode("utf-8", "replace"), tuple(raw), entry.logprob, entry.rank, top
        )
