"""The real server (`python -m server`) with faults injected into its model runner, for
RELIABILITY.md items 13 and 14 over HTTP. A request's seed says which fault it meets:

- `BREAKS_MID_WAY`: every forward that holds the request once it has 3 output tokens raises;
- `BREAKS_AT_ONCE`: every forward that holds it raises;
- `NEVER_FITS`: every forward that holds it runs out of device memory;
- `BREAKS_SECOND_CHOICE`: like `BREAKS_MID_WAY`, for the second choice of an `n > 1` request only;
- `KILLS_THE_LOOP`: scheduling a step that holds the request raises outside every per-request
  guard, as a bug in the engine itself would: the engine loop dies (RELIABILITY.md item 15).

Any other request is served as by the plain server. A fault breaks the whole forward, batched
neighbours included, as a real one would; telling whose request caused it is the engine's job.
"""

from __future__ import annotations

import torch

from engine.runner import ModelRunner
from engine.scheduler import Scheduler, SchedulerOutput
from server.cli import main

BREAKS_MID_WAY, BREAKS_AT_ONCE, NEVER_FITS, BREAKS_SECOND_CHOICE = 6661, 6662, 6663, 6664
KILLS_THE_LOOP = 6665
# What the injected error says: nothing of it may reach a client (RELIABILITY.md item 10).
SECRET = "injected fault at /srv/app/secret.py"

_execute = ModelRunner.execute
_schedule = Scheduler.schedule


def execute_with_faults(self: ModelRunner, output: SchedulerOutput):
    for chunk in output.chunks:
        request = chunk.request
        seed = request.params.seed
        mid_way = request.num_output_tokens >= 3
        if seed == BREAKS_AT_ONCE or (seed == BREAKS_MID_WAY and mid_way):
            raise RuntimeError(SECRET)
        if seed == BREAKS_SECOND_CHOICE and request.index == 1 and mid_way:
            raise RuntimeError(SECRET)
        if seed == NEVER_FITS:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {SECRET}")
    return _execute(self, output)


def schedule_with_faults(self: Scheduler) -> SchedulerOutput:
    if any(r.params.seed == KILLS_THE_LOOP for r in [*self.waiting, *self.running]):
        raise RuntimeError(f"scheduler bug: {SECRET}")
    return _schedule(self)


if __name__ == "__main__":
    ModelRunner.execute = execute_with_faults
    Scheduler.schedule = schedule_with_faults
    main()
