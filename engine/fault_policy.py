"""What the engine does when a step's forward fails, so that one request's fault fails it alone.

- A forward over several requests that fails is retried one request at a time, so a request
  that breaks the forward, or that runs out of device memory even alone, is found and dealt with
  alone: the others go on (their KV slots are simply written again; seeded generators were
  restored by the runner).
- Alone, a failure fails the request; running out of memory requeues it, up to MAX_OOM_RETRIES.
- Under tensor or expert parallelism none of this applies: a failing step is a `RankFailure`,
  which ends the engine (the ranks cannot retry a step some of them have half run).
- A fault that comes with the batch size instead (each request then runs fine alone) halves the
  requests per step once it repeats, and the cap grows back after clean steps.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.errors import RankFailure
from engine.outputs import RequestOutput
from engine.request import Request
from engine.runner import ModelRunner
from engine.runner_output import RunnerOutput
from engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)

# A request whose steps ran out of device memory this many times fails instead of being retried.
MAX_OOM_RETRIES = 2
# Consecutive steps whose batched forward failed while each request ran alone, before the engine
# halves the number of requests per step; clean steps after which a lowered cap doubles again.
BATCH_FAULTS_BEFORE_SHRINK = 2
STEPS_BEFORE_REGROW = 1000


@dataclass(frozen=True, slots=True)
class StepResult:
    """What a step's forward came to."""

    ran: SchedulerOutput  # the part of the step that ran
    run: RunnerOutput  # what it produced
    failed: list[RequestOutput]  # outputs of the requests it failed


def _nothing_ran(failed: list[RequestOutput]) -> StepResult:
    return StepResult(SchedulerOutput((), ()), RunnerOutput({}, {}, {}), failed)


class FaultPolicy:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        config: EngineConfig,
        fail: Callable[[Request, BaseException], RequestOutput],
        requeued: Callable[[Sequence[Request]], None],
    ) -> None:
        """`fail` ends a request with an error output; `requeued` is told of requests sent back
        to the queue (their prompt is computed again)."""
        self.runner = runner
        self.scheduler = scheduler
        self.config = config
        self._fail = fail
        self._requeued = requeued
        self.num_retried_steps = 0  # steps whose forward failed and was retried one request at a time
        self._batch_faults = 0  # consecutive retried steps in which every request ran alone
        self._clean_steps = 0  # steps run whole since the batch cap was last lowered

    def execute(self, sched: SchedulerOutput, alone: bool = False) -> StepResult:
        """Run the step's forward, finding and dealing with a request that breaks it."""
        try:
            run = self.runner.execute(sched)
        except RankFailure:
            raise  # the ranks are out of step: nothing can be retried (the engine stops)
        except torch.cuda.OutOfMemoryError as exc:
            traceback.clear_frames(exc.__traceback__)  # let the failed step's tensors go
            if len(sched.chunks) == 1:
                return _nothing_ran(self._after_out_of_memory(sched.chunks[0], exc))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            error: Exception = exc
        except Exception as exc:
            if len(sched.chunks) == 1:
                request = sched.chunks[0].request
                logger.exception("model step failed; failing request %s", request.request_id)
                return _nothing_ran([self._fail(request, exc)])
            traceback.clear_frames(exc.__traceback__)
            error = exc
        else:
            if not alone:  # a whole step ran
                self._after_clean_step()
            return StepResult(sched, run, [])
        return self._retry_alone(sched, error)

    def _retry_alone(self, sched: SchedulerOutput, error: Exception) -> StepResult:
        self.num_retried_steps += 1
        logger.warning(
            "model step of %d requests failed (%s: %s); retrying each alone",
            len(sched.chunks), type(error).__name__, error,
        )  # fmt: skip
        ran: list[ScheduledChunk] = []
        merged = RunnerOutput({}, {}, {})
        failed: list[RequestOutput] = []
        for chunk in sched.chunks:
            one = self.execute(SchedulerOutput((chunk,), ()), alone=True)
            ran += one.ran.chunks
            merged.sampled.update(one.run.sampled)
            merged.logprobs.update(one.run.logprobs)
            merged.prompt_logprobs.update(one.run.prompt_logprobs)
            failed += one.failed
        if len(ran) == len(sched.chunks):  # each request ran alone: the batch broke the forward
            self._note_batch_fault(len(sched.chunks), error)
        else:
            self._batch_faults = 0
        return StepResult(SchedulerOutput(tuple(ran), sched.preempted), merged, failed)

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
        self._requeued(self.scheduler.set_max_batch(cap))

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
        self._requeued([request])
        return []
