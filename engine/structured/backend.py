"""The small interface a grammar engine meets, so that llguidance (or xgrammar) sits behind it.

A bitmask row is `ceil(V / 32)` int32 words for a vocabulary of V logits: token t is allowed when
bit `t % 32` of word `t // 32` is set. No torch: rows are numpy arrays the runner copies to the
device.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from engine.structured.spec import StructuredOutput


class GrammarMatcher(Protocol):
    """One sequence's position in its grammar."""

    def fill_bitmask(self, row: np.ndarray) -> None:
        """Write the tokens allowed next into `row` (one contiguous int32 bitmask row)."""
        ...

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar does not allow it (then it is broken)."""
        ...

    @property
    def is_finished(self) -> bool:
        """The text is a complete instance and nothing but EOS may follow."""
        ...

    @property
    def error(self) -> str:
        """Why the matcher broke ("" while it is fine)."""
        ...


class CompiledGrammar(Protocol):
    """A grammar ready to match: shared by every request with the same spec."""

    def matcher(self, prefix: str = "") -> GrammarMatcher:
        """A fresh matcher for one sequence, past `prefix` (an assistant prefix the reply continues).

        Raises `InvalidStructuredOutput` when the prefix is not the start of an instance.
        """
        ...


class GrammarBackend(Protocol):
    """Compiles specs for one served model's vocabulary."""

    name: str
    mask_words: int  # int32 words in one bitmask row

    def compile(self, spec: StructuredOutput) -> CompiledGrammar:
        """Raises `InvalidStructuredOutput` naming what cannot be enforced; never ignores part of it."""
        ...
