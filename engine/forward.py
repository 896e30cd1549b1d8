"""One rank's forward of a step: the flat batch, the model (CUDA graphs where they fit), the logits.

Rank 0's model runner and every worker rank run it on the same chunks and rows, in step, so
the collectives inside the model line up. It owns this rank's share of the paged KV pool and
the preallocated batch buffers.

Shape legend: T tokens in the step, R logits rows, V vocabulary, D hidden size, S sequences.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from engine.config import EngineConfig
from model.batch import BatchBuilder, SequenceChunk
from model.cuda_graphs import DecodeGraphs, graph_batch_sizes
from model.mixtral import MixtralModel, allocate_kv_cache
from model.native.decoder import NativeDecoder
from model.ops import select_kernels

log = logging.getLogger(__name__)


class ForwardStep:
    def __init__(self, model: MixtralModel, config: EngineConfig) -> None:
        self.model = model
        param = model.embed_tokens.weight
        self.device = param.device
        model.use_kernels(select_kernels(config.kernels, self.device))
        bs = config.block_size
        if model.kernels.name == "triton" and (bs < 16 or bs & (bs - 1)):
            raise ValueError(f"the Triton kernels need a block_size that is a power of two >= 16, got {bs}")
        self.native = _native_decoder(model, config) if self.device.type == "cpu" else None
        if config.pack_cpu_weights:
            model.pack_for_cpu()  # no-op off the CPU, on the Triton path, or where oneDNN cannot pack
        self.kv_cache = allocate_kv_cache(
            model.config, config.num_kv_blocks, bs, param.dtype, self.device, model.parallel
        )  # [L, 2, N, B, K, Dh], this rank's kv heads
        self.builder = BatchBuilder(
            max_num_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_blocks_per_seq=config.max_blocks_per_seq,
            block_size=bs,
            device=self.device,
        )
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and model.kernels.name == "triton" and config.cuda_graph_max_batch:
            sizes = graph_batch_sizes(min(config.cuda_graph_max_batch, config.max_num_seqs))
            self.graphs = DecodeGraphs(model, self.kv_cache, config.max_blocks_per_seq, sizes)
            self.graphs.capture()  # every rank captures the same sizes in the same order

    @torch.inference_mode()
    def __call__(
        self, chunks: Sequence[SequenceChunk], prompt_rows: Sequence[int], sample_rows: Sequence[int]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Run `chunks` (decodes first); the logits [R, V] fp32 of the flat token rows for prompt
        logprobs, then of those sampled from (None for no rows). Two LM-head calls, so a
        request's prompt logprobs leave the sampled rows' logits as they are without them.
        Under tensor parallelism, rank 0 gets them whole and the other ranks their share."""
        batch = self.builder.build(chunks)
        if self.graphs is not None and self.graphs.can_run(batch.attn):
            hidden = self.graphs.run(batch.input_ids, batch.attn)  # [S, D]
        elif self.native is not None and not batch.attn.prefills:
            hidden = self.native(batch.input_ids, self.kv_cache, batch.attn)  # [S, D]
        else:
            hidden = self.model(batch.input_ids, self.kv_cache, batch.attn)  # [T, D]
        prompt = self._logits(hidden, prompt_rows) if prompt_rows else None
        if not sample_rows:
            return prompt, None
        # The common case, each sequence's last token, is already on the device.
        last = _each_last_token(chunks, sample_rows)
        index = batch.logits_indices if last else self._index(sample_rows)
        return prompt, self.model.compute_logits(hidden.index_select(0, index))

    def _logits(self, hidden: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        return self.model.compute_logits(hidden.index_select(0, self._index(rows)))

    def _index(self, rows: Sequence[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)


def _native_decoder(model: MixtralModel, config: EngineConfig) -> NativeDecoder | None:
    """The native CPU decode step where `config.kernels` asks for it ('auto', 'native') and the
    model can take it; otherwise None, with the reason logged ('native' refuses to start)."""
    if config.kernels not in ("auto", "native"):
        return None
    decoder = NativeDecoder.create(model)
    if isinstance(decoder, str):
        if config.kernels == "native":
            raise RuntimeError(f"kernels='native': the native CPU decode step cannot run: {decoder}")
        log.info("CPU decode: the torch step, because %s", decoder)
        return None
    log.info("CPU decode: the native step (model.native), %d threads", decoder.threads)
    return decoder


def _each_last_token(chunks: Sequence[SequenceChunk], rows: Sequence[int]) -> bool:
    """Whether `rows` are exactly every sequence's last token, in order (checked on the host)."""
    if len(rows) != len(chunks):
        return False
    end = 0
    for chunk, row in zip(chunks, rows, strict=True):
        end += len(chunk.token_ids)
        if row != end - 1:
            return False
    return True
