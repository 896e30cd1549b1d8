"""Incremental detokenization and stop strings, for streaming text out token by token.

Text is produced the way vLLM does it: decode a short window of ids ending at the newest token
and emit what it adds beyond the same window without that token. The window starts with the
last few context ids (the prompt, or a `prefix` the reply continues), so SentencePiece's leading
space (`▁Paris` after `The capital is`) comes out as " Paris", not "Paris"; a character whose
UTF-8 bytes are split over several byte-fallback tokens is held until it is complete (the
window's decode ends in U+FFFD until then).

Stop strings are matched on the emitted text across token boundaries: text that could still
begin a stop string (an ending that is the start of one) is held back until it can no longer
begin one, and a match ends the text right before the stop string, which never appears in the
output. The first stop string to appear wins: the one that is complete first, reading left to
right (on a tie, the one that starts first). So the outcome does not depend on how the ids are
grouped into `add` calls, and generation can end as soon as a stop string is complete.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Decode = Callable[[list[int]], str]

# Context tokens kept before the newest ones: enough for any leading-space or merge effect.
_CONTEXT_TOKENS = 6
_REPLACEMENT = "\ufffd"
_MAX_CONTINUATION_BYTES = 3  # a UTF-8 character is at most 4 bytes


def _context_window(decode: Decode, context_ids: Sequence[int]) -> list[int]:
    """The last context ids, starting on a character: a window that began inside one spelled with
    byte-fallback tokens would decode as U+FFFD, and HF's ByteFallback decoder then spoils the
    whole run of byte tokens, characters generated after the context included."""
    start = max(0, len(context_ids) - _CONTEXT_TOKENS)
    for _ in range(_MAX_CONTINUATION_BYTES):
        if start == 0 or not decode(list(context_ids[start:])).startswith(_REPLACEMENT):
            break
        start -= 1
    return list(context_ids[start:])


@dataclass(frozen=True, slots=True)
class DetokenizedText:
    text: str  # new text safe to send
    stop_string: str | None = None  # set when a stop string matched (generation must end)


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas; one instance per generated sequence."""

    def __init__(self, decode: Decode, context_ids: Sequence[int] = (), stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = _context_window(decode, context_ids)
        self._prefix_offset = 0  # window start
        self._read_offset = len(self._ids)  # ids before this are already emitted as text
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""  # decoded text not yet released (may still start a stop string)
        self._stopped = False

    def add(self, token_ids: Sequence[int]) -> DetokenizedText:
        """Feed newly generated ids; returns the text they release."""
        if self._stopped:
            return DetokenizedText("")
        for token_id in token_ids:
            self._ids.append(token_id)
            self._pending += self._step()
        return self._release(final=False)

    def finish(self) -> DetokenizedText:
        """Release the text held back for stop-string matching (generation ended otherwise)."""
        if self._stopped:
            return DetokenizedText("")
        if self._read_offset < len(self._ids):  # bytes that never formed a character: emit as they are
            before = self._decode(self._ids[self._prefix_offset : self._read_offset])
            self._pending += self._decode(self._ids[self._prefix_offset :])[len(before) :]
            self._read_offset = len(self._ids)
        return self._release(final=True)

    def _step(self) -> str:
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            return ""  # an incomplete character, or a token that adds no text (yet)
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset > _CONTEXT_TOKENS:  # keep the id list short
            drop = self._prefix_offset - _CONTEXT_TOKENS
            del self._ids[:drop]
            self._prefix_offset -= drop
            self._read_offset -= drop
        return after[len(before) :]

    def _release(self, final: bool) -> DetokenizedText:
        match = self._find_stop()
        if match is not None:
            position, stop = match
            text, self._pending, self._stopped = self._pending[:position], "", True
            return DetokenizedText(text, stop)
        cut = len(self._pending) if final else self._releasable()
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return DetokenizedText(text)

    def _releasable(self) -> int:
        """Length of the pending text that can no longer begin a stop string (no match is pending)."""
        pending = self._pending
        for start in range(max(0, len(pending) - self._hold), len(pending)):
            tail = pending[start:]
            if any(stop.startswith(tail) for stop in self._stop):
                return start
        return len(pending)

    def _find_stop(self) -> tuple[int, str] | None:
        """The match that is complete first (then the one that starts first): (its start, the stop)."""
        best: tuple[int, int, str] | None = None
        for stop in self._stop:
            position = self._pending.find(stop)
            if position >= 0 and (best is None or (position + len(stop), position) < best[:2]):
                best = (position + len(stop), position, stop)
        return None if best is None else (best[1], best[2])
