"""The model runner: one scheduled step in, sampled tokens out.

It owns the paged KV pool and the preallocated batch buffers, lays a `SchedulerOutput` out as a
flat batch (decodes first), runs the model, and samples for the chunks that reached the end of
their known tokens. Per-request generators live here so a seeded request samples the same
tokens alone or in any batch, across preemptions too.

Shape legend: T tokens in the step, S sampled sequences, V vocabulary, D hidden size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from engine.config import EngineConfig
from engine.runner_output import RunnerOutput
from engine.sampler import Sampler, SamplingRow, TokenMask, make_generator, prompt_logprobs
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.structured import GrammarBitmask
from model.batch import BatchBuilder, SequenceChunk
from model.cuda_graphs import DecodeGraphs, graph_batch_sizes
from model.mixtral import MixtralModel, allocate_kv_cache
from model.ops import select_kernels

GrammarMasks = Callable[[Sequence[str]], GrammarBitmask | None]


class ModelRunner:
    def __init__(
        self,
        model: MixtralModel,
        config: EngineConfig,
        seed: int = 0,
        grammar_masks: GrammarMasks | None = None,
    ) -> None:
        """`grammar_masks` gives the grammar masks of the sequences a step samples, by id, in order."""
        self.model = model
        self.config = config
        self._grammar_masks = grammar_masks
        param = model.embed_tokens.weight
        self.device = param.device
        model.use_kernels(select_kernels(config.kernels, self.device))
        bs = config.block_size
        if model.kernels.name == "triton" and (bs < 16 or bs & (bs - 1)):
            raise ValueError(f"the Triton kernels need a block_size that is a power of two >= 16, got {bs}")
        if config.pack_cpu_weights:
            model.pack_for_cpu()  # no-op off the CPU, on the Triton path, or where oneDNN cannot pack
        self.kv_cache = allocate_kv_cache(
            model.config, config.num_kv_blocks, config.block_size, param.dtype, self.device
        )  # [L, 2, N, B, K, Dh]
        self.builder = BatchBuilder(
            max_num_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_blocks_per_seq=config.max_blocks_per_seq,
            block_size=config.block_size,
            device=self.device,
        )
        self.sampler = Sampler(model.config.vocab_size, torch.Generator(device=self.device).manual_seed(seed))
        self._generators: dict[str, torch.Generator] = {}
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and model.kernels.name == "triton" and config.cuda_graph_max_batch:
            sizes = graph_batch_sizes(min(config.cuda_graph_max_batch, config.max_num_seqs))
            self.graphs = DecodeGraphs(model, self.kv_cache, config.max_blocks_per_seq, sizes)
            self.graphs.capture()

    def release(self, request_id: str) -> None:
        """Forget per-request state of a finished request."""
        self._generators.pop(request_id, None)

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        """Run one step. If it raises, the seeded generators of its requests are as before it, so
        a step retried later (after an out-of-memory requeue) draws the same numbers."""
        saved = {
            rid: self._generators[rid].get_state()
            for rid in (c.request.request_id for c in output.chunks)
            if rid in self._generators
        }
        try:
            return self._execute(output)
        except BaseException:
            for chunk in output.chunks:
                rid = chunk.request.request_id
                if rid in saved:
                    self._generators[rid].set_state(saved[rid])
                else:
                    self._generators.pop(rid, None)  # created by the failed step: start afresh
            raise

    @torch.inference_mode()
    def _execute(self, output: SchedulerOutput) -> RunnerOutput:
        chunks = sorted(output.chunks, key=lambda c: len(c.token_ids) != 1)  # decodes first (stable)
        batch = self.builder.build([SequenceChunk(c.token_ids, c.num_computed, c.block_ids) for c in chunks])
        if self.graphs is not None and self.graphs.can_run(batch.attn):
            hidden = self.graphs.run(batch.input_ids, batch.attn)  # [S, D]
        else:
            hidden = self.model(batch.input_ids, self.kv_cache, batch.attn)  # [T, D]
        result = RunnerOutput({}, {}, {})
        self._prompt_logprobs(chunks, hidden, batch.attn.query_start_loc.tolist(), result)
        rows = [i for i, c in enumerate(chunks) if c.sample]
        if rows:
            index = batch.logits_indices[rows] if len(rows) < len(chunks) else batch.logits_indices
            logits = self.model.compute_logits(hidden.index_select(0, index))  # [S, V] fp32
            self._sample([chunks[i] for i in rows], logits, result)
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

    def _prompt_logprobs(
        self, chunks: Sequence[ScheduledChunk], hidden: torch.Tensor, starts: list[int], result: RunnerOutput
    ) -> None:
        """Logprobs of the prompt tokens this step's chunks predict (positions 1 .. P-1)."""
        for row, chunk in enumerate(chunks):
            req = chunk.request
            k = req.params.prompt_logprobs
            if k is None or chunk.num_computed >= req.num_prompt_tokens - 1:
                continue
            first = chunk.num_computed  # logits at position p predict prompt token p + 1
            last = min(chunk.num_computed + len(chunk.token_ids), req.num_prompt_tokens - 1)
            logits = self.model.compute_logits(hidden[starts[row] : starts[row] + last - first])
            targets = req.prompt_token_ids[first + 1 : last + 1]
            result.prompt_logprobs[req.request_id] = prompt_logprobs(logits, targets, k)


def _choice_seed(seed: int, index: int) -> int:
    """Choice 0 uses the request's seed; other choices of an n > 1 request get distinct derived seeds."""
    return seed if index == 0 else hash((seed, index)) & ((1 << 63) - 1)
