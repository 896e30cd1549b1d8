"""From sampled tokens to what a caller receives: text, stop strings, logprobs, choices.

The engine core schedules and runs sequences; this turns each step's tokens into `RequestOutput`s.
It owns one `SequenceState` per sequence (a choice of an `n > 1` request is a sequence of its
own): the detokenizer, which also finds stop strings, and the prompt logprobs gathered so far.
A sequence under a grammar (structured output) keeps its matcher there too: the matcher advances
with each token this processor accepts, and only here, so neither a preemption (the tokens stay)
nor a step retried request by request moves it twice. Before a step samples, the processor fills
the grammar masks of the sequences that sample (`grammar_bitmask`). Plain Python: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine.errors import ErrorCode
from engine.outputs import Logprob, RequestOutput, TopLogprob
from engine.request import FinishReason, Request
from engine.runner_output import RunnerOutput, TokenLogprob
from engine.structured import CompiledGrammar, GrammarBitmask, GrammarMatcher
from tokenization.detokenizer import IncrementalDetokenizer


class TextDecoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


@dataclass(slots=True, eq=False)
class SequenceState:
    """What the output processor keeps for one sequence until its last output."""

    request: Request
    detokenizer: IncrementalDetokenizer
    prompt_logprobs: list[Logprob | None] | None = None  # entries so far; None: none gathered yet
    matcher: GrammarMatcher | None = None  # structured output: where the text is in its grammar


class GrammarViolation(RuntimeError):
    """A sampled token the sequence's grammar does not allow (the mask and the matcher disagree)."""


class OutputProcessor:
    def __init__(
        self, decoder: TextDecoder, finish: Callable[[Request, FinishReason], None], mask_words: int = 0
    ) -> None:
        """`finish` ends a sequence in the scheduler (a stop string or a complete grammar ends it
        here); `mask_words` is the width of a grammar bitmask row."""
        self.decoder = decoder
        self._finish = finish
        self.mask_words = mask_words
        self._requests: dict[str, list[SequenceState]] = {}  # the caller's request id -> its choices
        self._sequences: dict[str, SequenceState] = {}  # a sequence's own id -> its state

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def add(
        self,
        request_id: str,
        choices: Sequence[Request],
        context_ids: Sequence[int],
        grammar: CompiledGrammar | None = None,
    ) -> None:
        """Track a request's choices; `context_ids` seed detokenization (a `prefix` the reply
        continues), and a grammar's matchers start past their text. Raises
        `InvalidStructuredOutput` before tracking anything if that prefix breaks the grammar."""
        matchers: list[GrammarMatcher | None] = [None] * len(choices)
        if grammar is not None:  # only then is the context's text needed (completions send the prompt)
            prefix = self.decoder.decode(list(context_ids)) if context_ids else ""
            matchers = [grammar.matcher(prefix) for _ in choices]
        states = [
            SequenceState(
                req, IncrementalDetokenizer(self.decoder.decode, context_ids, req.params.stop), matcher=m
            )
            for req, m in zip(choices, matchers, strict=True)
        ]
        self._sequences.update((s.request.request_id, s) for s in states)
        self._requests[request_id] = states

    def choices(self, request_id: str) -> list[Request]:
        """The choices of a request still tracked (none once each has had its last output)."""
        return [s.request for s in self._requests.get(request_id, [])]

    def sequence(self, sequence_id: str) -> SequenceState | None:
        """The state of a sequence still tracked, by its own id (`request_id#i` for a choice i > 0)."""
        return self._sequences.get(sequence_id)

    def drop(self, request_id: str) -> list[Request]:
        """Stop tracking a request (aborted); its choices, for the scheduler to finish."""
        states = self._requests.pop(request_id, [])
        for state in states:
            self._sequences.pop(state.request.request_id, None)
        return [s.request for s in states]

    def restart_prompt_logprobs(self, requests: Sequence[Request]) -> None:
        """Preempted before their first token: their prompt is recomputed from the start, and so
        are its logprobs; drop the entries gathered so far."""
        for req in requests:
            state = self._sequences.get(req.request_id)
            if state is not None and req.num_output_tokens == 0:
                state.prompt_logprobs = None

    def process(self, req: Request, run: RunnerOutput) -> RequestOutput | None:
        """What one sequence's step produced; None when there is nothing to tell (a prefill chunk
        short of the prompt's end, or a sequence aborted while the step ran)."""
        state = self._sequences.get(req.request_id)
        if state is None:
            return None
        if req.request_id in run.prompt_logprobs:
            entries = [self._logprob(e) for e in run.prompt_logprobs[req.request_id]]
            state.prompt_logprobs = (state.prompt_logprobs or [None]) + entries
        if req.request_id not in run.sampled:
            return None
        token = req.token_ids[-1]
        grammar_done = state.matcher is not None and self._advance(state.matcher, token)
        text = state.detokenizer.add([token])
        if text.stop_string is not None:
            self._finish(req, FinishReason.STOP)
            req.stop_reason = text.stop_string
        elif grammar_done and not req.is_finished:  # only EOS could follow: stop without the step
            self._finish(req, FinishReason.STOP)
        new_text = text.text + (state.detokenizer.finish().text if req.is_finished else "")
        logprob = run.logprobs.get(req.request_id)
        return self.output(req, (token,), new_text, (self._logprob(logprob),) if logprob else ())

    @staticmethod
    def _advance(matcher: GrammarMatcher, token: int) -> bool:
        """Move the matcher past `token`; whether the grammar is now complete."""
        if not matcher.accept(token):
            raise GrammarViolation(f"token {token} broke the grammar: {matcher.error or 'not allowed'}")
        return matcher.is_finished

    def grammar_bitmask(self, sequence_ids: Sequence[str]) -> GrammarBitmask | None:
        """The masks of the sequences among `sequence_ids` (the rows a step samples, in order)
        that have a grammar; None when none has. Advances nothing: a retried step asks again."""
        rows = [
            (i, state.matcher)
            for i, sid in enumerate(sequence_ids)
            if (state := self._sequences.get(sid)) is not None and state.matcher is not None
        ]
        if not rows:
            return None
        bits = np.zeros((len(rows), self.mask_words), dtype=np.int32)  # [R, W]
        for r, (_, matcher) in enumerate(rows):
            matcher.fill_bitmask(bits[r])
        # A broken matcher allows only EOS (then fails at `accept`): min_tokens must not mask that.
        return GrammarBitmask([i for i, _ in rows], bits, [m.is_finished or bool(m.error) for _, m in rows])

    def output(
        self,
        req: Request,
        tokens: tuple[int, ...],
        text: str,
        logprobs: tuple[Logprob, ...],
        error: str | None = None,
        error_code: ErrorCode | None = None,
    ) -> RequestOutput:
        """A sequence's output; its last one (the request finished) ends its tracking."""
        state = self._sequences.get(req.request_id)
        prompt_lp = None
        if req.params.prompt_logprobs is not None and req.num_output_tokens <= 1:
            gathered = state.prompt_logprobs if state is not None else None
            prompt_lp = tuple(gathered or [None])
            if state is not None:
                state.prompt_logprobs = None
        out = RequestOutput(
            request_id=req.parent_id or req.request_id,
            index=req.index,
            new_token_ids=tokens,
            new_text=text,
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_lp,
            error=error,
            error_code=error_code,
            queue_time=None
            if req.first_scheduled_time is None
            else req.first_scheduled_time - req.arrival_time,
        )
        if req.is_finished:
            self._forget(req)
        return out

    def _forget(self, req: Request) -> None:
        self._sequences.pop(req.request_id, None)
        parent = req.parent_id or req.request_id
        states = self._requests.get(parent)
        if states is not None and all(s.request.request_id not in self._sequences for s in states):
            del self._requests[parent]  # every choice has delivered its last output

    def _logprob(self, entry: TokenLogprob) -> Logprob:
        raw = self.decoder.token_bytes(entry.token_id)
        top = tuple(  # a token a grammar masked (-inf) is no alternative: JSON cannot even encode it
            TopLogprob(t, (b := self.decoder.token_bytes(t)).decode("utf-8", "replace"), tuple(b), lp)
            for t, lp in entry.top
            if lp != -math.inf
        )
        return Logprob(
            entry.token_id, raw.decode("utf-8", "replace"), tuple(raw), entry.logprob, entry.rank, top
        )
