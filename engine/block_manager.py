"""The paged KV pool's bookkeeping: fixed-size blocks, reference counts and the prefix cache.

Plain Python. A block is free when no request references it; a free block may still hold a
cached prefix (its hash stays registered) until it is handed out again, least recently freed
first. A full block's hash chains its tokens to its parent's hash, so a hit means the whole
prefix up to and including that block is identical.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from engine.request import Request

_ROOT_HASH = 0


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and registered in the prefix cache
    key: tuple[int, tuple[int, ...]] | None = None  # (parent hash, tokens): checked on a hit


class NoFreeBlocksError(RuntimeError):
    """Internal: allocation was attempted without checking `can_allocate` first."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self._cached: dict[int, int] = {}  # hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        """New blocks `request` needs so that `num_tokens` tokens fit."""
        return max(0, -(-num_tokens // self.block_size) - len(request.block_ids))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks of the prefix cache that hold `request`'s leading full blocks, in order.

        At least one token is always left to compute, since the step must produce logits.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = _ROOT_HASH
        max_blocks = (request.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            key = (parent, tuple(request.token_ids[i * self.block_size : (i + 1) * self.block_size]))
            block_id = self._cached.get(hash(key))
            if block_id is None or self.blocks[block_id].key != key:
                break
            hits.append(block_id)
            parent = hash(key)
        return hits

    def can_allocate(self, request: Request, num_tokens: int, cached: Sequence[int] = ()) -> bool:
        """Whether `request` can hold `num_tokens` tokens after taking the `cached` blocks."""
        from_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        new = max(0, -(-num_tokens // self.block_size) - len(request.block_ids) - len(cached))
        return new + from_free <= len(self._free)

    def allocate(self, request: Request, num_tokens: int, cached: Sequence[int] = ()) -> None:
        """Give `request` the `cached` blocks, then fresh ones until `num_tokens` tokens fit."""
        parent = request.block_hashes[-1] if request.block_hashes else _ROOT_HASH
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            request.block_ids.append(block_id)
            assert block.hash is not None and block.key is not None and block.key[0] == parent
            request.block_hashes.append(block.hash)
            parent = block.hash
        for _ in range(self.blocks_needed(request, num_tokens)):
            request.block_ids.append(self._take_free_block())

    def free(self, request: Request) -> None:
        """Drop `request`'s references; its blocks become reusable (cached ones stay findable)."""
        for block_id in reversed(request.block_ids):  # tail blocks are evicted first
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                self._free[block_id] = None
        request.block_ids.clear()
        request.block_hashes.clear()

    def cache_full_blocks(self, request: Request) -> None:
        """Register `request`'s newly completed blocks (computed tokens only) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = request.num_computed_tokens // bs
        parent = request.block_hashes[-1] if request.block_hashes else _ROOT_HASH
        for i in range(len(request.block_hashes), num_full):
            key = (parent, tuple(request.token_ids[i * bs : (i + 1) * bs]))
            h = hash(key)
            block = self.blocks[request.block_ids[i]]
            if h not in self._cached:  # a duplicate of a cached block stays private to its request
                self._cached[h] = block.block_id
                block.hash, block.key = h, key
            request.block_hashes.append(h)
            parent = h

    def _take_free_block(self) -> int:
        if not self._free:
            raise NoFreeBlocksError("no free KV blocks")
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict it from the prefix cache
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash = block.key = None
        block.ref_count = 1
        return block_id

    def check_invariants(self, requests: Sequence[Request]) -> None:
        """Reference counts equal the references held by `requests`; free set = unreferenced."""
        held: dict[int, int] = {}
        for r in requests:
            for b in r.block_ids:
                held[b] = held.get(b, 0) + 1
        for block in self.blocks:
            assert block.ref_count == held.get(block.block_id, 0), f"block {block.block_id} ref count"
            assert (block.ref_count == 0) == (block.block_id in self._free), (
                f"block {block.block_id} free set"
            )
