"""A small test driver for the paged-KV forward: block allocation the way an engine would do it,
but deliberately hostile: physical blocks are shuffled, handed out round-robin so sequences
interleave, and every free block is filled with NaN before each forward."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from model.batch import BatchBuilder, SequenceChunk
from model.mixtral import MixtralModel, allocate_kv_cache


class PagedHarness:
    def __init__(
        self,
        model: MixtralModel,
        num_blocks: int = 64,
        block_size: int = 5,
        seed: int = 0,
        decoder: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        """`decoder`: runs the steps that are all single-token decodes instead of the model's
        forward (the native CPU step); the model's forward runs the rest."""
        self.model = model
        self.decoder = decoder
        self.block_size = block_size
        dtype = model.embed_tokens.weight.dtype
        device = model.embed_tokens.weight.device
        self.kv = allocate_kv_cache(model.config, num_blocks, block_size, dtype, device, model.parallel)
        self.kv.fill_(float("nan"))
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.blocks: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.builder = BatchBuilder(4096, 64, num_blocks, block_size, device)

    def step(self, work: Sequence[tuple[int, Sequence[int]]]) -> list[torch.Tensor]:
        """Compute `work` [(seq id, new tokens)] in one forward; logits [n, V] per item, in order."""
        order = sorted(range(len(work)), key=lambda i: len(work[i][1]) != 1)  # decodes first
        self._allocate(work)
        for block in self.free:
            self.kv[:, :, block] = float("nan")
        chunks = [
            SequenceChunk(list(work[i][1]), self.computed.get(work[i][0], 0), list(self.blocks[work[i][0]]))
            for i in order
        ]
        batch = self.builder.build(chunks)
        forward = self.decoder if self.decoder is not None and not batch.attn.prefills else self.model
        hidden = forward(batch.input_ids, self.kv, batch.attn)
        logits = self.model.compute_logits(hidden)
        out: list[torch.Tensor] = [torch.empty(0)] * len(work)
        starts = batch.attn.query_start_loc.tolist()
        for row, i in enumerate(order):
            out[i] = logits[starts[row] : starts[row + 1]]
            seq = work[i][0]
            self.computed[seq] = self.computed.get(seq, 0) + len(work[i][1])
        return out

    def release(self, seq: int) -> None:
        self.free.extend(self.blocks.pop(seq))
        self.computed.pop(seq, None)

    def _allocate(self, work: Sequence[tuple[int, Sequence[int]]]) -> None:
        need = {}
        for seq, toks in work:
            total = self.computed.get(seq, 0) + len(toks)
            need[seq] = -(-total // self.block_size)
            self.blocks.setdefault(seq, [])
        while any(len(self.blocks[s]) < n for s, n in need.items()):
            for s, n in need.items():  # round-robin, so sequences' blocks interleave
                if len(self.blocks[s]) < n:
                    self.blocks[s].append(self.free.pop())

    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        return self.step(list(enumerate(prompts)))

    def greedy(self, prompts: Sequence[Sequence[int]], steps: int) -> list[list[int]]:
        """Batched greedy decoding of `steps` tokens after one batched prefill."""
        logits = self.prefill(prompts)
        out = [[int(lg[-1].argmax())] for lg in logits]
        for _ in range(steps - 1):
            logits = self.step([(i, [toks[-1]]) for i, toks in enumerate(out)])
            for toks, lg in zip(out, logits, strict=True):
                toks.append(int(lg[-1].argmax()))
        return out
