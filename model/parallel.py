"""How one model is split over the ranks of a `torch.distributed` group, and the collectives it calls.

Tensor parallel over N ranks (Megatron's split, as vLLM's):
- attention: the H query heads are divided, H/N per rank (q/k/v column-parallel, o row-parallel
  with an all-reduce). The K kv heads are divided too when N <= K; when N > K each kv head is
  replicated on N/K ranks, rank r holding head r*K//N, the head its query heads read.
- experts: each expert's FFN dimension F is divided (w1/w3 column-parallel, w2 row-parallel),
  one all-reduce after the weighted combine. The router is replicated.
- expert parallel instead (`expert_parallel`): whole experts, E/N per rank, each rank running
  its experts for the tokens routed to them; the same one all-reduce combines them (attention is
  tensor parallel either way, so every rank holds every token's hidden state).
- embedding and LM head: divided by vocabulary, V/N rows per rank; the embedding's partial
  rows are all-reduced, the logits gathered to rank 0.

A rank holds only its share of each weight (`model.checkpoint_layouts` maps the checkpoint's
tensors to that share) and of the KV cache. On one rank every range is whole and every
collective returns its input: the single-rank model is the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model.config import ModelConfig


@dataclass(frozen=True, slots=True)
class Parallel:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False
    group: Any = None  # the torch.distributed process group the collectives run on (None: default)

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} of {self.size} is not a rank")

    def check(self, config: ModelConfig) -> None:
        """Raise ValueError when `config`'s shapes cannot be divided over `size` ranks."""
        n = self.size
        if n == 1:
            return
        problems = []
        if config.num_heads % n:
            problems.append(f"{config.num_heads} attention heads do not divide by {n}")
        k = config.num_kv_heads
        if k % n and n % k:
            problems.append(f"{k} kv heads neither divide by {n} nor divide it")
        if config.vocab_size % n:
            problems.append(f"a vocabulary of {config.vocab_size} does not divide by {n}")
        experts = config.moe.num_experts if config.moe else 1
        if self.expert_parallel and experts % n:
            problems.append(f"{experts} experts do not divide by {n} (expert parallel)")
        if not self.expert_parallel and config.intermediate_size % n:
            problems.append(f"an FFN size of {config.intermediate_size} does not divide by {n}")
        if problems:
            raise ValueError(f"this model cannot be split over {n} ranks: {'; '.join(problems)}")

    def _share(self, total: int) -> range:
        per = total // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def heads(self, num_heads: int) -> range:
        """The query heads this rank computes."""
        return self._share(num_heads)

    def kv_heads(self, num_kv_heads: int) -> range:
        """The kv heads this rank holds: its share, or the one head its query heads read."""
        if self.size <= num_kv_heads:
            return self._share(num_kv_heads)
        head = self.rank * num_kv_heads // self.size
        return range(head, head + 1)

    def experts(self, num_experts: int) -> range:
        """The experts this rank holds (all of them unless expert parallel)."""
        return self._share(num_experts) if self.expert_parallel else range(num_experts)

    def ffn(self, ffn_size: int) -> range:
        """The slice of each expert's FFN dimension this rank holds (all of it under expert parallel)."""
        return range(ffn_size) if self.expert_parallel else self._share(ffn_size)

    def vocab(self, vocab_size: int) -> range:
        """The rows of the embedding and of the LM head this rank holds."""
        return self._share(vocab_size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x`, in place (x itself on one rank)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's vocabulary share [S, V/N] as one [S, V] on rank 0; the other ranks get
        their own share back (x itself on one rank)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=self._global_rank(0), group=self.group)
        return torch.cat(parts, dim=-1) if parts is not None else x

    def _global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)


SINGLE = Parallel()
