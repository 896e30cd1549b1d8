"""A worker rank of a tensor- or expert-parallel engine: `python -m engine.worker`, started by rank 0.

It joins the ranks' group, loads its share of the weights and sizes its share of the KV pool in
step with the others (`engine.factory.load_share`), then runs each step rank 0 hands it
(`engine.step_channel`) until told to stop or until rank 0 is gone. Any failure ends the process
with a non-zero status, which rank 0 notices (`engine.workers`). Its spec comes in the
MIXTRAL_WORKER_SPEC environment variable, as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from engine.config import EngineArgs
from engine.factory import load_share
from engine.forward import ForwardStep
from engine.step_channel import Op, StepReader
from engine.workers import GO_KEY, RankMemory, die_with_parent, join_group, threads_per_rank

logger = logging.getLogger("mixtral_worker")


def serve_steps(reader: StepReader, forward: ForwardStep) -> int:
    """Run steps until STOP (returns 0) or until rank 0's pipe closes (returns 0: it is gone)."""
    while True:
        step = reader.receive()
        if step is None or step.op is Op.STOP:
            return 0
        forward(step.chunks, step.prompt_rows, step.sample_rows)


def main() -> int:
    spec = json.loads(os.environ.pop("MIXTRAL_WORKER_SPEC"))
    die_with_parent(spec["parent"])
    rank, size = spec["rank"], spec["size"]
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {rank}: %(message)s")
    args = EngineArgs(**spec["args"])
    if not args.device.startswith("cuda"):
        torch.set_num_threads(threads_per_rank(size))
    reader = StepReader(spec["steps"], spec["step_words"], size - 1, rank - 1, spec["wake_fd"])
    parallel, store = join_group(rank, size, spec["port"], args)

    def report_loaded(memory: RankMemory) -> None:  # read by `WorkerGroup.wait_loaded`
        store.set(f"loaded/{rank}", json.dumps(dataclasses.asdict(memory)))
        store.wait([GO_KEY])  # until every rank has loaded: the collectives that follow may begin

    share = load_share(Path(spec["model_dir"]), args, parallel, loaded=report_loaded)
    forward = ForwardStep(share.model, share.config)
    code = serve_steps(reader, forward)
    reader.close()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
