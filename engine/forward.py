"""One rank's forward of a step: the flat batch, the model (CUDA graphs where they fit), the logits.

Rank 0's model runner and every worker rank run it on the same chunks and rows, in step, so
the collectives inside the model line up. It owns this rank's share of the paged KV pool and
the preallocated batch buffers.

Shape legend: T tokens in the step, R logits rows, V vocabulary, D hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.config import EngineConfig
from model.batch import BatchBuilder, SequenceChunk
from model.cuda_graphs import DecodeGraphs, graph_batch_sizes
from model.mixtral import MixtralModel, allocate_kv_cache
from model.ops import select_kernels


class ForwardStep:
    def __init__(self, model: MixtralModel, config: EngineConfig) -> None:
        self.model = model
        param = model.embed_tokens.weight
        self.device = param.device
        model.use_kernels(select_kernels(config.kernels, self.device))
        bs = config.block_size
        if model.kernels.name == "triton" and (bs < 16 or bs & (bs - 1)):
            raise ValueError(f"the Triton kernels need a block_size that is a power of two >= 16, got {bs}")
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
    def __call__(self, chunks: Sequence[SequenceChunk], rows: Sequence[int]) -> torch.Tensor | None:
        """Run `chunks` (decodes first) and return the logits [R, V] fp32 of the flat token `rows`
        (None when there are none). Under tensor parallelism, rank 0 gets them whole and the
        other ranks their vocabulary share."""
        batch = self.builder.build(chunks)
        if self.graphs is not None and self.graphs.can_run(batch.attn):
            hidden = self.graphs.run(batch.input_ids, batch.attn)  # [S, D]
        else:
            hidden = self.model(batch.input_ids, self.kv_cache, batch.attn)  # [T, D]
        if not rows:
            return None
        if _each_last_token(chunks, rows):
            index = batch.logits_indices  # the common case, already on the device
        else:
            index = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)
        return self.model.compute_logits(hidden.index_select(0, index))  # [R, V]


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
