"""The flat batch the model runs on, and the builder that fills it from preallocated buffers.

A step mixes single-token decodes and multi-token prefill chunks of many sequences in one flat
batch of tokens. Decodes come first (rows [0, num_decodes) of the per-sequence tensors), so the
decode part has a fixed shape that CUDA graphs can capture; each prefill chunk is described on
the host by a `PrefillSpan`, because its query length decides its attention shape anyway.

Every device tensor in `AttentionMetadata` is a view into a buffer allocated once by
`BatchBuilder`, filled in place each step: no allocation, and on CUDA one host-to-device copy
per buffer (from pinned host buffers, which the next build refills only once those copies ran).

Shape legend: T tokens in the batch, S sequences, M block-table width (max blocks per sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class PrefillSpan:
    """Host-side description of one multi-token chunk in the batch."""

    seq_index: int  # row in block_tables / seq_lens
    query_start: int  # first token of the chunk in the flat batch
    query_len: int  # tokens computed this step
    seq_len: int  # tokens in the cache after this step (context + query)

    @property
    def context_len(self) -> int:
        return self.seq_len - self.query_len


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """What attention needs to read and write the paged KV cache for one step."""

    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, cache slot (block * block_size + offset) of each token
    block_tables: torch.Tensor  # [S, M] int64, physical blocks of each sequence
    seq_lens: torch.Tensor  # [S] int64, tokens in the cache after this step
    query_start_loc: torch.Tensor  # [S + 1] int64, offsets of each sequence's tokens in the batch
    num_decodes: int  # sequences [0, num_decodes) contribute exactly one token each
    prefills: tuple[PrefillSpan, ...]  # the remaining sequences, in batch order
    block_size: int

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


@dataclass(frozen=True, slots=True)
class SequenceChunk:
    """One sequence's part of a step: the tokens to compute and where its KV lives."""

    token_ids: Sequence[int]  # tokens computed this step (1 for a decode)
    num_computed: int  # tokens of this sequence already in the cache
    block_ids: Sequence[int]  # physical blocks covering num_computed + len(token_ids) tokens


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64, the last token of each sequence


class BatchBuilder:
    """Fills fixed-capacity metadata buffers for one step; the only allocator is `__init__`."""

    def __init__(
        self,
        max_num_tokens: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.block_size = block_size
        self.max_num_tokens = max_num_tokens
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        shapes = {
            "input_ids": (max_num_tokens,),
            "positions": (max_num_tokens,),
            "slot_mapping": (max_num_tokens,),
            "block_tables": (max_num_seqs, max_blocks_per_seq),
            "seq_lens": (max_num_seqs,),
            "query_start_loc": (max_num_seqs + 1,),
            "logits_indices": (max_num_seqs,),
        }
        self._host = {k: torch.zeros(s, dtype=torch.int64, pin_memory=pin) for k, s in shapes.items()}
        self._np = {k: t.numpy() for k, t in self._host.items()}
        self._copied: torch.cuda.Event | None = None  # the last upload's copies, on the device
        if self.device.type == "cpu":
            self._dev = self._host
        else:
            self._dev = {k: torch.zeros(s, dtype=torch.int64, device=self.device) for k, s in shapes.items()}

    def build(self, chunks: Sequence[SequenceChunk]) -> ForwardBatch:
        """Lay out `chunks` (decodes first) as one flat batch."""
        num_seqs = len(chunks)
        num_tokens = sum(len(c.token_ids) for c in chunks)
        self._check_capacity(chunks, num_tokens)
        if self._copied is not None:
            # The previous step's copies read these pinned host buffers asynchronously: they must
            # have run before the buffers are refilled. A step that samples waits for the device
            # anyway; one that does not (a prefill chunk short of the prompt's end, or any step on
            # a worker rank) would otherwise run on the next step's metadata.
            self._copied.synchronize()
        h = self._np
        bs = self.block_size
        prefills: list[PrefillSpan] = []
        num_decodes = 0
        width = 1
        t = 0
        for i, chunk in enumerate(chunks):
            n = len(chunk.token_ids)
            seq_len = chunk.num_computed + n
            if n == 1 and not prefills:
                num_decodes += 1
            elif n == 1:
                raise ValueError("decode chunks must come before prefill chunks in a batch")
            else:
                prefills.append(PrefillSpan(i, t, n, seq_len))
            blocks = np.asarray(chunk.block_ids, dtype=np.int64)
            pos = np.arange(chunk.num_computed, seq_len, dtype=np.int64)
            h["input_ids"][t : t + n] = chunk.token_ids
            h["positions"][t : t + n] = pos
            h["slot_mapping"][t : t + n] = blocks[pos // bs] * bs + pos % bs
            h["block_tables"][i, : len(blocks)] = blocks
            h["block_tables"][i, len(blocks) :] = 0  # padding: masked by seq_lens, any valid block
            h["seq_lens"][i] = seq_len
            h["query_start_loc"][i] = t
            width = max(width, len(blocks))
            t += n
            h["logits_indices"][i] = t - 1
        h["query_start_loc"][num_seqs] = t
        dev = self._upload(num_tokens, num_seqs)
        attn = AttentionMetadata(
            positions=dev["positions"][:num_tokens],
            slot_mapping=dev["slot_mapping"][:num_tokens],
            block_tables=dev["block_tables"][:num_seqs, :width],
            seq_lens=dev["seq_lens"][:num_seqs],
            query_start_loc=dev["query_start_loc"][: num_seqs + 1],
            num_decodes=num_decodes,
            prefills=tuple(prefills),
            block_size=bs,
        )
        return ForwardBatch(dev["input_ids"][:num_tokens], attn, dev["logits_indices"][:num_seqs])

    def _check_capacity(self, chunks: Sequence[SequenceChunk], num_tokens: int) -> None:
        if not chunks:
            raise ValueError("a batch needs at least one sequence")
        if len(chunks) > self.max_num_seqs or num_tokens > self.max_num_tokens:
            raise ValueError(
                f"batch of {len(chunks)} sequences / {num_tokens} tokens exceeds the builder's capacity "
                f"({self.max_num_seqs} / {self.max_num_tokens})"
            )
        for c in chunks:
            needed = -(-(c.num_computed + len(c.token_ids)) // self.block_size)
            if not needed <= len(c.block_ids) <= self.max_blocks_per_seq:
                raise ValueError(
                    f"a sequence of {c.num_computed + len(c.token_ids)} tokens needs {needed} blocks, "
                    f"got {len(c.block_ids)} (max {self.max_blocks_per_seq})"
                )

    def _upload(self, num_tokens: int, num_seqs: int) -> dict[str, torch.Tensor]:
        if self._dev is self._host:
            return self._dev
        used = {
            "input_ids": num_tokens,
            "positions": num_tokens,
            "slot_mapping": num_tokens,
            "block_tables": num_seqs,
            "seq_lens": num_seqs,
            "query_start_loc": num_seqs + 1,
            "logits_indices": num_seqs,
        }
        for key, n in used.items():
            self._dev[key][:n].copy_(self._host[key][:n], non_blocking=True)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record()
        return self._dev
