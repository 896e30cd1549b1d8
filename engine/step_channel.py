"""How rank 0 hands each step to the worker ranks: packed integers in shared memory and a wake-up byte.

A step is what every rank needs to run the same forward: per sequence its token ids, the number
of tokens already in the cache and its block table (positions and slot mapping follow from those,
as `model.batch.BatchBuilder` derives them), and the flat rows whose logits are computed (for
prompt logprobs, then for sampling: two calls, so that one request's prompt logprobs leave the
others' sampled logits as they would be alone). Rank 0 packs them into one int64 array in a
memory-mapped file under /dev/shm and writes one byte to each worker's pipe; a worker blocks on
its pipe (no timeout: an idle server is not a fault), reads the array, builds the same batch,
and writes the step's number into its own acknowledgement word. No Python object is pickled.

One buffer serves every step: rank 0 writes a step only once every worker has acknowledged the
one before. On gloo that is always so by then (the step's collectives blocked until every rank
was in them); NCCL's collectives return before they run, so there the wait is real, if short.
A closed pipe means rank 0 is gone: the worker's read returns EOF and it exits.

Layout (int64): header [op, step, num_seqs, num_prompt_rows, num_sample_rows, used], one
acknowledgement word per worker, then per sequence [num_tokens, num_computed, num_blocks], then
every sequence's token ids, then their block ids, then the prompt-logprob rows and the sampled
rows.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np

from model.batch import SequenceChunk

HEADER = 6
_ACK_POLL_S = 50e-6
_SHM_DIR = Path("/dev/shm")


class Op(IntEnum):
    STEP = 1
    STOP = 2


@dataclass(frozen=True, slots=True)
class Step:
    op: Op
    number: int
    chunks: tuple[SequenceChunk, ...]
    prompt_rows: tuple[int, ...]  # flat token rows whose logits give prompt logprobs
    sample_rows: tuple[int, ...]  # flat token rows whose logits are sampled from


def capacity_words(max_num_seqs: int, max_num_tokens: int, max_blocks_per_seq: int) -> int:
    """Payload words of the largest step: every token's logits (prompt logprobs) and one more per
    sequence (sampling) at most."""
    rows = max_num_tokens + max_num_seqs
    return 3 * max_num_seqs + max_num_tokens + max_num_seqs * max_blocks_per_seq + rows


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
        self.words = HEADER + num_workers + words
        self._buf, self._array = _map(self.path, self.words, create=True)
        self._acks = self._array[HEADER : HEADER + num_workers]
        self._payload = HEADER + num_workers
        pipes = [os.pipe() for _ in range(num_workers)]
        self.read_fds = [r for r, _ in pipes]
        self._write_fds = [w for _, w in pipes]
        self._number = 0

    def unlink(self) -> None:
        """Remove the file once every worker has it mapped (nothing is left if rank 0 is killed)."""
        self.path.unlink(missing_ok=True)

    def send(
        self,
        chunks: Sequence[SequenceChunk],
        prompt_rows: Sequence[int],
        sample_rows: Sequence[int],
        timeout_s: float,
    ) -> None:
        """Publish a step and wake every worker; BrokenPipeError if one has gone, TimeoutError if
        one has not read the step before within `timeout_s`."""
        a = self._array
        n = len(chunks)
        meta = np.array(
            [(len(c.token_ids), c.num_computed, len(c.block_ids)) for c in chunks], dtype=np.int64
        ).reshape(n, 3)
        tokens = [t for c in chunks for t in c.token_ids]
        blocks = [b for c in chunks for b in c.block_ids]
        used = self._payload + 3 * n + len(tokens) + len(blocks) + len(prompt_rows) + len(sample_rows)
        if used > self.words:
            raise ValueError(f"a step of {used} words exceeds the step buffer ({self.words})")
        self._wait_for_acks(timeout_s)
        at = self._payload
        for part in (meta.ravel(), tokens, blocks, prompt_rows, sample_rows):
            size = len(part)
            a[at : at + size] = part
            at += size
        self._number += 1
        a[:HEADER] = (Op.STEP, self._number, n, len(prompt_rows), len(sample_rows), used)
        self._wake()

    def _wait_for_acks(self, timeout_s: float) -> None:
        """Until every worker has read the last step (at once on gloo; see the module's notes)."""
        deadline = time.monotonic() + timeout_s
        while self._acks.min(initial=self._number) < self._number:
            if time.monotonic() > deadline:
                raise TimeoutError(f"a worker did not read step {self._number} within {timeout_s:g} s")
            time.sleep(_ACK_POLL_S)

    def stop(self) -> None:
        """Tell every worker to exit (the pipes of workers already gone are skipped)."""
        self._number += 1
        self._array[:HEADER] = (Op.STOP, self._number, 0, 0, 0, self._payload)
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
        del self._array, self._acks
        self._buf.close()
        self.unlink()


class StepReader:
    """Worker `index`'s end (rank index + 1) of a `StepWriter` of `words` words for `num_workers`:
    the shared buffer by path, and its pipe's read end."""

    def __init__(self, path: str | Path, words: int, num_workers: int, index: int, wake_fd: int) -> None:
        self._buf, self._array = _map(Path(path), words, create=False)
        self._payload = HEADER + num_workers
        self._fd = wake_fd
        self._index = index
        self._number = 0

    def receive(self) -> Step | None:
        """The next step (blocking); None once rank 0 has closed the pipe (it is gone)."""
        if not os.read(self._fd, 1):
            return None
        a = self._array
        op, number, n, num_prompt, num_sample, used = (int(x) for x in a[:HEADER])
        if number != self._number + 1:
            raise RuntimeError(f"step {number} arrived after step {self._number}")
        self._number = number
        if op == Op.STOP:
            return Step(Op.STOP, number, (), (), ())
        words = a[self._payload : used].tolist()
        a[HEADER + self._index] = number  # read: rank 0 may write the next step
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
        prompt_end = block_at + num_prompt
        return Step(
            Op(op),
            number,
            tuple(chunks),
            tuple(words[block_at:prompt_end]),
            tuple(words[prompt_end : prompt_end + num_sample]),
        )

    def close(self) -> None:
        os.close(self._fd)
        del self._array
        self._buf.close()
