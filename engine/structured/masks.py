"""One step's grammar masks: bitmask rows for the sequences that sample under a grammar. No torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class GrammarBitmask:
    """Masks for some of a step's sampled rows.

    `rows[i]` is the position, among the rows the runner samples, of the sequence whose mask is
    `bits[i]` (int32 words, see `engine.structured.backend`); `finished[i]` is true when that
    grammar allows nothing but EOS, where `min_tokens` must give way.
    """

    rows: list[int]
    bits: np.ndarray  # [R, W] int32
    finished: list[bool]
