"""The real server (`python -m server`) held at gates that a test opens and closes: files named by
environment variables.

- `GATE_LOAD`: building the engine waits until this file exists, so a test can send requests
  while the model is still loading.
- `GATE_STEPS`: while this file exists, the engine takes no step, so whatever was admitted stays
  in flight for as long as the test needs (the warm-up steps run before a test can create it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import server.launch
from engine.llm_engine import Engine
from server.cli import main

_POLL_S = 0.02
_build_engine = server.launch.build_engine
_step = Engine.step


def wait_while(condition: Callable[[], bool]) -> None:
    while condition():
        time.sleep(_POLL_S)


def gated_build_engine(*args, **kwargs):
    gate = Path(os.environ["GATE_LOAD"]) if "GATE_LOAD" in os.environ else None
    if gate is not None:
        wait_while(lambda: not gate.exists())
    return _build_engine(*args, **kwargs)


def gated_step(self: Engine):
    gate = Path(os.environ["GATE_STEPS"]) if "GATE_STEPS" in os.environ else None
    if gate is not None:
        wait_while(gate.exists)
    return _step(self)


if __name__ == "__main__":
    server.launch.build_engine = gated_build_engine
    Engine.step = gated_step
    main()
