"""Decode steps replayed from CUDA graphs, so small-batch decode is not bound by launch overhead.

A decode-only step of S sequences runs the captured graph of the smallest captured batch size
>= S. Inputs are copied into static buffers first; the padding rows get slot -1 (their KV write
is skipped) and length 0 (their attention reads nothing), so they touch no sequence's cache, and
their outputs are dropped. The block-table buffer is as wide as the longest sequence allowed,
which costs nothing: the attention kernel's loop bound is each row's length, read on the device.

Only a forward without host syncs can be captured: the Triton backend (`model.triton_backend`), whose MoE
dispatch and attention launch shapes depend on the batch size alone. Graphs of all sizes share
one memory pool; they are captured largest first, after a warm-up run that compiles the kernels.

Shape legend: S sequences in the step, P padded (captured) batch size, M block-table width,
D hidden size.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from model.batch import AttentionMetadata
from model.mixtral import MixtralModel

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to `max_batch` (vLLM's ladder): at most 7 wasted rows."""
    sizes = [b for b in (1, 2, 4) if b <= max_batch]
    sizes += list(range(8, max_batch + 1, 8))
    if max_batch not in sizes:
        sizes.append(max_batch)
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(
        self,
        model: MixtralModel,
        kv_caches: torch.Tensor,  # [L, 2, N, B, K, Dh]
        max_blocks_per_seq: int,
        batch_sizes: list[int],
        use_graphs: bool = True,
    ) -> None:
        """`use_graphs=False` replays by running the forward on the static buffers: the same
        padding and buffer logic without CUDA, which is how it is tested on CPU."""
        if model.kernels.name != "triton":
            raise ValueError("CUDA graphs need the Triton kernels: the torch path syncs with the host")
        self.model = model
        self.kv_caches = kv_caches
        self.batch_sizes = sorted(batch_sizes)
        self.max_batch = self.batch_sizes[-1]
        self.block_size = kv_caches.shape[3]
        device = kv_caches.device
        n = self.max_batch

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        self.input_ids, self.positions, self.slot_mapping, self.seq_lens = (
            zeros(n),
            zeros(n),
            zeros(n),
            zeros(n),
        )
        self.block_tables = zeros(n, max_blocks_per_seq)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int64, device=device)
        self.use_graphs = use_graphs
        self._replays: dict[int, Callable[[], torch.Tensor]] = {}

    def capture(self) -> None:
        """Capture a decode forward at every batch size (largest first, one shared memory pool)."""
        self._reset_padding(0)
        if not self.use_graphs:
            for size in self.batch_sizes:
                self._replays[size] = functools.partial(
                    self.model, self.input_ids[:size], self.kv_caches, self._meta(size)
                )
            return
        pool = None
        for size in reversed(self.batch_sizes):
            meta = self._meta(size)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: compile kernels, settle allocator state
                self.model(self.input_ids[:size], self.kv_caches, meta)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(self.input_ids[:size], self.kv_caches, meta)
            pool = graph.pool()
            self._replays[size] = functools.partial(_replay, graph, hidden)
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.batch_sizes)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return not meta.prefills and 0 < meta.num_decodes <= self.max_batch and bool(self._replays)

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [S, D] of a decode-only step, by graph replay."""
        num_seqs = meta.num_decodes
        size = self.padded_size(num_seqs)
        width = meta.block_tables.shape[1]
        self.input_ids[:num_seqs].copy_(input_ids)
        self.positions[:num_seqs].copy_(meta.positions)
        self.slot_mapping[:num_seqs].copy_(meta.slot_mapping)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens)
        self.block_tables[:num_seqs, :width].copy_(meta.block_tables)
        self._reset_padding(num_seqs)
        return self._replays[size]()[:num_seqs]

    def _reset_padding(self, first: int) -> None:
        """Rows from `first` on: write nowhere, attend to nothing, read token 0."""
        self.slot_mapping[first:].fill_(-1)
        self.seq_lens[first:].zero_()
        self.input_ids[first:].zero_()
        self.positions[first:].zero_()

    def padded_size(self, num_seqs: int) -> int:
        return next(b for b in self.batch_sizes if b >= num_seqs)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            num_decodes=size,
            prefills=(),
            block_size=self.block_size,
        )


def _replay(graph: torch.cuda.CUDAGraph, hidden: torch.Tensor) -> torch.Tensor:
    graph.replay()
    return hidden
