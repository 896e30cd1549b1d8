"""The model runner: one scheduled step in, sampled tokens out.

It lays a `SchedulerOutput` out as sequence chunks (decodes first) and the flat rows whose
logits the step needs (prompt logprobs, then the sampled sequences' last tokens), runs the
forward (`engine.forward`, which owns the KV pool), and samples for the chunks that reached the
end of their known tokens. Per-request generators live here so a seeded request samples the
same tokens alone or in any batch, across preemptions too.

Under tensor or expert parallelism this is rank 0: it hands each step to the worker ranks
(`engine.workers`) before running its own share, and any failure is a `RankFailure`.

Shape legend: T tokens in the step, S sampled sequences, V vocabulary, D hidden size.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from engine.config import EngineConfig
from engine.errors import RankFailure
from engine.forward import ForwardStep
from engine.runner_output import RunnerOutput
from engine.sampler import Sampler, SamplingRow, TokenMask, make_generator, prompt_logprobs
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.structured import GrammarBitmask
from engine.workers import WorkerGroup
from model.batch import SequenceChunk
from model.mixtral import MixtralModel

GrammarMasks = Callable[[Sequence[str]], GrammarBitmask | None]


class ModelRunner:
    def __init__(
        self,
        model: MixtralModel,
        config: EngineConfig,
        seed: int = 0,
        grammar_masks: GrammarMasks | None = None,
        workers: WorkerGroup | None = None,
    ) -> None:
        """`grammar_masks` gives the grammar masks of the sequences a step samples, by id, in order.
        `workers`: the other ranks, when `model` is rank 0's share of a parallel model."""
        self.model = model
        self.config = config
        self._grammar_masks = grammar_masks
        self.workers = workers
        self.forward = ForwardStep(model, config)
        self.device = self.forward.device
        self.sampler = Sampler(model.config.vocab_size, torch.Generator(device=self.device).manual_seed(seed))
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        """Forget per-request state of a finished request."""
        self._generators.pop(request_id, None)

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        """Run one step. If it raises, the seeded generators of its requests are as before it, so
        a step retried later (after an out-of-memory requeue) draws the same numbers. Under
        parallelism a failure is a `RankFailure`: the ranks are out of step and cannot retry."""
        saved = {
            rid: self._generators[rid].get_state()
            for rid in (c.request.request_id for c in output.chunks)
            if rid in self._generators
        }
        try:
            return self._execute(output)
        except BaseException as exc:
            for chunk in output.chunks:
                rid = chunk.request.request_id
                if rid in saved:
                    self._generators[rid].set_state(saved[rid])
                else:
                    self._generators.pop(rid, None)  # created by the failed step: start afresh
            if self.workers is not None and not isinstance(exc, RankFailure):
                raise RankFailure(f"rank 0's step failed: {type(exc).__name__}: {exc}"[:500]) from exc
            raise

    @torch.inference_mode()
    def _execute(self, output: SchedulerOutput) -> RunnerOutput:
        chunks = sorted(output.chunks, key=lambda c: len(c.token_ids) != 1)  # decodes first (stable)
        seqs = [SequenceChunk(c.token_ids, c.num_computed, c.block_ids) for c in chunks]
        spans = _prompt_logprob_spans(chunks)
        starts = list(itertools.accumulate((len(c.token_ids) for c in chunks), initial=0))
        prompt_rows = [starts[i] + r for i, first, last in spans for r in range(last - first)]
        sampled = [c for c in chunks if c.sample]
        sample_rows = [starts[i + 1] - 1 for i, c in enumerate(chunks) if c.sample]
        if self.workers is not None:
            self.workers.send(seqs, prompt_rows, sample_rows)
        prompt_logits, logits = self.forward(seqs, prompt_rows, sample_rows)  # [R, V] fp32 each
        result = RunnerOutput({}, {}, {})
        at = 0
        for i, first, last in spans:
            assert prompt_logits is not None
            req = chunks[i].request
            k = req.params.prompt_logprobs
            assert k is not None
            targets = req.prompt_token_ids[first + 1 : last + 1]
            rows = prompt_logits[at : at + last - first]
            result.prompt_logprobs[req.request_id] = prompt_logprobs(rows, targets, k)
            at += last - first
        if sampled:
            assert logits is not None
            self._sample(sampled, logits, result)
        return result

    def _sample(self, chunks: Sequence[ScheduledChunk], logits: torch.Tensor, result: RunnerOutput) -> None:
        rows = [
            SamplingRow(
                params=c.request.params,
                prompt_token_ids=c.request.prompt_token_ids,
                output_token_ids=c.request.output_token_ids,
                generator=self._generator(c),
                eos_token_id=c.request.eos_token_id,
            )
            for c in chunks
        ]
        out = self.sampler(logits, rows, self._token_mask(chunks))
        for chunk, token, logprob in zip(chunks, out.token_ids, out.logprobs, strict=True):
            result.sampled[chunk.request.request_id] = token
            if logprob is not None:
                result.logprobs[chunk.request.request_id] = logprob

    def _token_mask(self, chunks: Sequence[ScheduledChunk]) -> TokenMask | None:
        if self._grammar_masks is None:
            return None
        bitmask = self._grammar_masks([c.request.request_id for c in chunks])
        if bitmask is None:
            return None
        bits = torch.from_numpy(bitmask.bits).to(self.device, non_blocking=True)  # [R, W]
        return TokenMask(bitmask.rows, bits, bitmask.finished)

    def _generator(self, chunk: ScheduledChunk) -> torch.Generator | None:
        seed = chunk.request.params.seed
        if seed is None:
            return None
        rid = chunk.request.request_id
        if rid not in self._generators:
            self._generators[rid] = make_generator(_choice_seed(seed, chunk.request.index))
        return self._generators[rid]


def _prompt_logprob_spans(chunks: Sequence[ScheduledChunk]) -> list[tuple[int, int, int]]:
    """(chunk index, first, last) for each chunk whose tokens predict prompt tokens with logprobs
    wanted: the logits at positions first .. last-1 predict prompt tokens first+1 .. last."""
    spans = []
    for i, chunk in enumerate(chunks):
        req = chunk.request
        if req.params.prompt_logprobs is None or chunk.num_computed >= req.num_prompt_tokens - 1:
            continue
        first = chunk.num_computed
        last = min(chunk.num_computed + len(chunk.token_ids), req.num_prompt_tokens - 1)
        spans.append((i, first, last))
    return spans


def _choice_seed(seed: int, index: int) -> int:
    """Choice 0 uses the request's seed; other choices of an n > 1 request get distinct derived seeds."""
    return seed if index == 0 else hash((seed, index)) & ((1 << 63) - 1)
