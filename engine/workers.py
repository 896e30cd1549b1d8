"""The ranks of a tensor- or expert-parallel engine: starting them, joining them, watching them.

Rank 0 is the server's engine (scheduler, sampler, grammars, detokenizing) and runs its own
share of the model; ranks 1..N-1 are worker processes (`python -m engine.worker`) that run only
their share, step by step as rank 0 hands the steps out (`engine.step_channel`).

Joining goes through torch.distributed's TCP store on 127.0.0.1, polled by rank 0 so that a
worker that dies while starting or loading is seen at once instead of after a rendezvous
timeout. The collectives then run on one process group (NCCL on GPUs, gloo on CPU) whose
timeout is `collective_timeout_s`: a rank that stops answering mid-step is a `RankFailure`
within it, not a hang. (On NCCL the collectives run on the device, and PyTorch's NCCL watchdog
handles a timeout by tearing the process down, TORCH_NCCL_ASYNC_ERROR_HANDLING's default: the
server still exits non-zero, without the dead-engine answers first.) A worker that exits is
noticed by a watcher thread, and the engine checks it before each step. Workers die with rank 0
(PR_SET_PDEATHSIG) and exit when told to stop or when its pipe closes, and the step buffer's
file is unlinked once they have mapped it, so nothing is left behind.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import EngineArgs
from engine.errors import RankFailure
from engine.step_channel import StepWriter
from model.batch import SequenceChunk
from model.parallel import Parallel

logger = logging.getLogger(__name__)

# Starting and loading: how long rank 0 waits for every worker to join, and then to load its share.
STARTUP_TIMEOUT_S = 1800.0
_POLL_S = 0.05
GO_KEY = "loaded/all"  # set by rank 0 once every rank has its weights
# How long workers get to exit when told to stop: after a clean shutdown, and after a failure
# (when a worker may be hung in a collective that will never complete).
STOP_GRACE_S = 10.0
FAILED_STOP_GRACE_S = 1.0
_PR_SET_PDEATHSIG = 1


def rank_device(device: str, rank: int) -> str:
    """Rank r's device: cuda:r (cuda:k+r for a base cuda:k); the CPU for every rank on a CPU."""
    if not device.startswith("cuda"):
        return device
    base = int(device.partition(":")[2] or 0)
    return f"cuda:{base + rank}"


def threads_per_rank(size: int) -> int:
    """OpenMP threads for each of `size` ranks on one CPU: the cores shared out (one each on 2 cores
    at TP=2), unless OMP_NUM_THREADS says otherwise."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return max(1, len(os.sched_getaffinity(0)) // size)


def join_group(
    rank: int, size: int, port: int, args: EngineArgs, store: dist.TCPStore | None = None
) -> tuple[Parallel, dist.TCPStore]:
    """Join the ranks' process group (rank 0 passes the store it polled); this rank's `Parallel`."""
    if store is None:
        store = dist.TCPStore(
            "127.0.0.1", port, size, is_master=False, timeout=timedelta(seconds=STARTUP_TIMEOUT_S)
        )
        store.set(f"joined/{rank}", "1")
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(rank_device(args.device, rank)))
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=args.collective_timeout_s),
    )
    return Parallel(rank, size, args.expert_parallel), store


@dataclass(frozen=True, slots=True)
class RankMemory:
    """What one rank reported once its weights were in, counted in that rank's process."""

    weights_bytes: int  # its parameters
    load_rss_bytes: int  # how much its own resident memory (RssAnon) grew while they loaded


class WorkerGroup:
    """Ranks 1..N-1, seen from rank 0: started by `start_workers`, handed steps by `send`."""

    def __init__(self, model_dir: Path, args: EngineArgs, step_words: int) -> None:
        self.size = args.tensor_parallel_size
        self._args = args
        self._writer = StepWriter(self.size - 1, step_words)
        self._store_port = _free_port()
        self._store = dist.TCPStore(
            "127.0.0.1",
            self._store_port,
            self.size,
            is_master=True,
            timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
            wait_for_workers=False,
        )
        self.failure: str | None = None
        self.shares: list[RankMemory] = []  # by rank, once loaded
        self._closing = False
        self._spec = {
            "model_dir": str(model_dir),
            "args": dataclasses.asdict(args),
            "size": self.size,
            "port": self._store_port,
            "steps": str(self._writer.path),
            "step_words": self._writer.words,
            "parent": os.getpid(),
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self) -> None:
        """Start the worker processes (`python -m engine.worker`), each watched by a thread."""
        for rank, fd in enumerate(self._writer.read_fds, start=1):
            spec = self._spec | {"rank": rank, "wake_fd": fd}
            proc = subprocess.Popen(
                [sys.executable, "-m", "engine.worker"],
                env=os.environ | {"MIXTRAL_WORKER_SPEC": json.dumps(spec)},
                pass_fds=(fd,),
            )
            self.procs.append(proc)
            watcher = threading.Thread(
                target=self._watch, args=(rank, proc), name=f"rank-{rank}", daemon=True
            )
            watcher.start()
        for fd in self._writer.read_fds:  # the workers hold them now
            os.close(fd)
        self._writer.read_fds = []

    def join(self) -> Parallel:
        """Wait until every worker has joined the store, then form the group with them."""
        self._wait_for("joined", "start")
        self._writer.unlink()  # every worker has mapped the step buffer before joining
        parallel, _ = join_group(0, self.size, self._store_port, self._args, self._store)
        return parallel

    def wait_loaded(self, ours: RankMemory) -> None:
        """Wait until every worker has loaded its share of the weights (rank 0, which has loaded
        its own, passes what it holds), keep what each rank reported (`shares`), and let them all
        go on together: the collectives that follow have only `collective_timeout_s`, and ranks
        can finish loading minutes apart."""
        self._wait_for("loaded", "load its share of the weights")
        reports = [json.loads(self._store.get(f"loaded/{rank}")) for rank in range(1, self.size)]
        self.shares = [ours, *(RankMemory(**r) for r in reports)]
        self._store.set(GO_KEY, "1")

    def _wait_for(self, key: str, what: str) -> None:
        keys = [f"{key}/{rank}" for rank in range(1, self.size)]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._store.check(keys):
            self.check()
            if time.monotonic() > deadline:
                raise RankFailure(f"the worker ranks did not {what} within {STARTUP_TIMEOUT_S:g} s")
            time.sleep(_POLL_S)

    def send(
        self, chunks: Sequence[SequenceChunk], prompt_rows: Sequence[int], sample_rows: Sequence[int]
    ) -> None:
        """Hand a step to every worker; `RankFailure` if one has gone or stopped reading."""
        self.check()
        try:
            self._writer.send(chunks, prompt_rows, sample_rows, self._args.collective_timeout_s)
        except BrokenPipeError as exc:
            raise RankFailure("a worker rank is gone (its step pipe is closed)") from exc
        except TimeoutError as exc:
            raise RankFailure(str(exc)) from exc

    def check(self) -> None:
        """Raise `RankFailure` once a worker has exited."""
        if self.failure is not None:
            raise RankFailure(self.failure)

    def _watch(self, rank: int, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        if not self._closing:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            self.failure = f"worker rank {rank} (pid {proc.pid}) {how}"
            logger.error("%s: the engine cannot go on", self.failure)

    def close(self, failed: bool = False) -> None:
        """Stop the workers, killing any that have not exited within a grace period (short after
        a failure, when one may be stuck in a collective that will never complete), and leave
        the group (not after a failure: destroying it could wait on those collectives)."""
        self._closing = True
        self._writer.stop()
        deadline = time.monotonic() + (FAILED_STOP_GRACE_S if failed else STOP_GRACE_S)
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("worker pid %d did not stop; killing it", proc.pid)
                proc.kill()
                proc.wait()
        self._writer.close()
        if dist.is_initialized() and not failed:
            dist.destroy_process_group()


def start_workers(model_dir: Path, args: EngineArgs, step_words: int) -> tuple[WorkerGroup, Parallel]:
    """Start ranks 1..N-1 and join them as rank 0 (stopping them again if that fails)."""
    group = WorkerGroup(model_dir, args, step_words)
    try:
        group.spawn()
        return group, group.join()
    except BaseException:
        group.close(failed=True)
        raise


def die_with_parent(parent: int) -> None:
    """In a worker, first thing: SIGKILL it when the thread that started it (rank 0's engine)
    ends, and exit now if that parent is already gone. (Set here rather than between fork and
    exec, which is not safe in a process with threads.)"""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        raise SystemExit(f"rank 0 (pid {parent}) is gone")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
