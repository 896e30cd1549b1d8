"""How rank 0 hands each step to the worker ranks: packed integers in shared memory and a wake-up byte.

A step is what every rank needs to run the same forward: per sequence its token ids, the number
of tokens already in the cache and its block table (positions and slot mapping follow from those,
as `model.batch.BatchBuilder` derives them), and the flat rows whose logits are computed. Rank 0
packs them into one int64 array in a memory-mapped file under /dev/shm and writes one byte to
each worker's pipe; a worker blocks on its pipe (no timeout: an idle server is not a fault),
reads the array and builds the same batch. No Python object is pickled.

The buffer is rewritten only after the step before it has run on every rank (its forward's
collectives need them all), so one buffer is enough. A closed pipe means rank 0 is gone: the
worker's read returns EOF and it exits.

Layout (int64): header [op, step, num_seqs, num_rows, used], then per sequence
[num_tokens, num_computed, num_blocks], then every sequence's token ids, then their block ids,
then the logits rows.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np

from model.batch import SequenceChunk

HEADER = 5
_SHM_DIR = Path("/dev/shm")


class Op(IntEnum):
    STEP = 1
    STOP = 2


@dataclass(frozen=True, slots=True)
class Step:
    op: Op
    number: int
    chunks: tuple[SequenceChunk, ...]
    rows: tuple[int, ...]  # flat token rows whose logits are computed, in order


def capacity_words(max_num_seqs: int, max_num_tokens: int, max_blocks_per_seq: int) -> int:
    """Words of the largest step: every row's logits (prompt logprobs) and one more per sequence."""
    return (
        HEADER
        + 3 * max_num_seqs
        + max_num_tokens
        + max_num_seqs * max_blocks_per_seq
        + (max_num_tokens + max_num_seqs)
    )


def _map(path: Path, words: int, create: bool) -> tuple[mmap.mmap, np.ndarray]:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, words * 8)
        buf = mmap.mmap(fd, words * 8)
    finally:
        os.close(fd)
    return buf, np.frombuffer(buf, dtype=np.int64)


class StepWriter:
    """Rank 0's end: one shared buffer, one pipe per worker (`read_fds` go to the workers)."""

    def __init__(self, num_workers: int, words: int) -> None:
        where = _SHM_DIR if _SHM_DIR.is_dir() else Path(tempfile.gettempdir())
        self.path = Path(tempfile.mktemp(prefix="mixtral-steps-", dir=where))
        self.words = words
        self._buf, self._array = _map(self.path, words, create=True)
        pipes = [os.pipe() for _ in range(num_workers)]
        self.read_fds = [r for r, _ in pipes]
        self._write_fds = [w for _, w in pipes]
        self._number = 0

    def send(self, chunks: Sequence[SequenceChunk], rows: Sequence[int]) -> None:
        """Publish a step and wake every worker; BrokenPipeError if one has gone."""
        a = self._array
        n = len(chunks)
        meta = np.array(
            [(len(c.token_ids), c.num_computed, len(c.block_ids)) for c in chunks], dtype=np.int64
        ).reshape(n, 3)
        tokens = [t for c in chunks for t in c.token_ids]
        blocks = [b for c in chunks for b in c.block_ids]
        used = HEADER + 3 * n + len(tokens) + len(blocks) + len(rows)
        if used > self.words:
            raise ValueError(f"a step of {used} words exceeds the step buffer ({self.words})")
        at = HEADER
        for part in (meta.ravel(), tokens, blocks, rows):
            size = len(part)
            a[at : at + size] = part
            at += size
        self._number += 1
        a[:HEADER] = (Op.STEP, self._number, n, len(rows), used)
        self._wake()

    def stop(self) -> None:
        """Tell every worker to exit (the pipes of workers already gone are skipped)."""
        self._number += 1
        self._array[:HEADER] = (Op.STOP, self._number, 0, 0, HEADER)
        self._wake(ignore_gone=True)

    def _wake(self, ignore_gone: bool = False) -> None:
        for fd in self._write_fds:
            try:
                os.write(fd, b"\x01")
            except BrokenPipeError:
                if not ignore_gone:
                    raise

    def close(self) -> None:
        for fd in self._write_fds + self.read_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._write_fds, self.read_fds = [], []
        del self._array
        self._buf.close()
        self.path.unlink(missing_ok=True)


class StepReader:
    """A worker's end: the shared buffer by path, and its pipe's read end."""

    def __init__(self, path: str | Path, words: int, wake_fd: int) -> None:
        self._buf, self._array = _map(Path(path), words, create=False)
        self._fd = wake_fd
        self._number = 0

    def receive(self) -> Step | None:
        """The next step (blocking); None once rank 0 has closed the pipe (it is gone)."""
        if not os.read(self._fd, 1):
            return None
        a = self._array
        op, number, n, num_rows, used = (int(x) for x in a[:HEADER])
        if number != self._number + 1:
            raise RuntimeError(f"step {number} arrived after step {self._number}")
        self._number = number
        if op == Op.STOP:
            return Step(Op.STOP, number, (), ())
        words = a[HEADER:used].tolist()
        meta, at = words[: 3 * n], 3 * n
        chunks = []
        token_at, block_at = at, at + sum(meta[0::3])
        for i in range(n):
            num_tokens, num_computed, num_blocks = meta[3 * i : 3 * i + 3]
            chunks.append(
                SequenceChunk(
                    words[token_at : token_at + num_tokens],
                    num_computed,
                    words[block_at : block_at + num_blocks],
                )
            )
            token_at += num_tokens
            block_at += num_blocks
        return Step(Op(op), number, tuple(chunks), tuple(words[block_at : block_at + num_rows]))

    def close(self) -> None:
        os.close(self._fd)
        del self._array
        self._buf.close()
