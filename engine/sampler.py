"""Choose the next token of every sequence in a batch from the model's logits.

Order of operations (vLLM v1's): a grammar mask (structured output) sets the tokens it forbids
to -inf in the logits themselves, as vLLM masks before its sampler; logprobs come from those
logits (raw for a row without a grammar, the masked distribution for one with); then logit
bias, min-tokens masking, penalties and banned tokens, which cannot unmask a token (-inf stays
-inf); then greedy argmax, or temperature, min-p, top-k, top-p and sampling by an exponential
race (argmax of probs / q with q ~ Exp(1), which picks token i with probability probs[i]).
Each stage runs as one pass over the rows that need it and is skipped when no row does, so an
all-greedy batch without processing costs one argmax.

Shape legend: S rows (sequences) in the batch, V vocabulary, P rows that need a stage,
R rows that sample at random (U of them unseeded), L longest token list among P rows, N positions,
K top alternatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.runner_output import TokenLogprob
from engine.sampling_params import SamplingParams

_SEED_MODULUS = 1 << 64  # torch generators take seeds in [0, 2**64); the API allows [-2**63, 2**64)


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """One sequence to sample a token for."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # tokens generated so far by this sequence
    generator: torch.Generator | None  # the sequence's own generator when it has a seed, else None
    eos_token_id: int | None


@dataclass(frozen=True, slots=True)
class TokenMask:
    """Grammar masks for some rows of a batch: `bits[i]` allows the tokens of row `rows[i]`.

    A mask row is int32 words: token t is allowed when bit t % 32 of word t // 32 is set.
    `finished[i]`: the grammar allows nothing but EOS, so `min_tokens` gives way to it.
    """

    rows: list[int]
    bits: torch.Tensor  # [R, W] int32, on the logits' device
    finished: list[bool]


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    """One token per row, and its logprob where the row asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None where params.logprobs is None


@dataclass(slots=True)
class _Plan:
    """Which rows need which stage; built in one pass over the rows."""

    greedy: list[int] = field(default_factory=list)
    random: list[int] = field(default_factory=list)
    logprobs: list[int] = field(default_factory=list)
    bias: list[int] = field(default_factory=list)
    min_tokens: list[int] = field(default_factory=list)
    banned: list[int] = field(default_factory=list)
    penalties: list[int] = field(default_factory=list)

    @property
    def processes(self) -> bool:
        return bool(self.bias or self.min_tokens or self.penalties or self.banned)


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded deterministically; any seed in [-2**63, 2**64) is taken modulo 2**64."""
    generator = torch.Generator()
    generator.manual_seed(seed % _SEED_MODULUS)
    return generator


class Sampler:
    """Samples one token per row; unseeded rows share the batch generator.

    Without an explicit batch generator, one is made on the logits' device at first use (so unseeded
    noise on a GPU is drawn there, not on the CPU and copied), seeded from OS entropy: unseeded
    requests differ between server runs. Pass a seeded generator for a reproducible engine.
    """

    def __init__(self, vocab_size: int, generator: torch.Generator | None = None) -> None:
        self.vocab_size = vocab_size
        self.generator = generator

    def __call__(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], mask: TokenMask | None = None
    ) -> SamplerOutput:
        """Pick a token for each row of `logits` [S, V] (fp32), one row per `SamplingRow`; `mask`'s
        rows are masked in `logits` in place first."""
        if logits.dim() != 2 or logits.shape[0] != len(rows) or logits.shape[1] != self.vocab_size:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} for {len(rows)} rows and vocabulary {self.vocab_size}"
            )
        if mask is not None:
            apply_token_mask(logits, mask)
        plan = _make_plan(rows, mask)
        processed = _process(logits, rows, plan)  # [S, V]; `logits` itself stays raw
        if not plan.random:
            token_ids = processed.argmax(dim=-1).tolist()
        else:
            token_ids = self._choose(processed, rows, plan)
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        if plan.logprobs:
            index = torch.tensor(plan.logprobs, device=logits.device)  # [P]
            raw = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)  # [P, V]
            chosen = [token_ids[i] for i in plan.logprobs]
            ks = [rows[i].params.logprobs or 0 for i in plan.logprobs]
            for i, entry in zip(plan.logprobs, _gather_logprobs(raw, chosen, ks), strict=True):
                logprobs[i] = entry
        return SamplerOutput(token_ids, logprobs)

    def _choose(self, processed: torch.Tensor, rows: Sequence[SamplingRow], plan: _Plan) -> list[int]:
        """Greedy argmax for greedy rows, filtered sampling for the others, in one result list."""
        device = processed.device
        chosen = torch.empty(len(rows), dtype=torch.long, device=device)  # [S]
        if plan.greedy:
            greedy = torch.tensor(plan.greedy, device=device)
            chosen[greedy] = processed.index_select(0, greedy).argmax(dim=-1)
        random = torch.tensor(plan.random, device=device)
        params = [rows[i].params for i in plan.random]
        probs = sampling_probs(processed.index_select(0, random), params)  # [R, V]
        noise = self._exponential_noise([rows[i].generator for i in plan.random], device)  # [R, V]
        chosen[random] = (probs / noise).argmax(dim=-1)
        return chosen.tolist()

    def _exponential_noise(
        self, generators: list[torch.Generator | None], device: torch.device
    ) -> torch.Tensor:
        """Exp(1) noise [R, V]: exactly one [V] draw from each seeded row's own generator, the rest in
        one draw from the batch generator, so a seeded row never depends on its batch."""
        noise = torch.empty(len(generators), self.vocab_size, device=device)  # [R, V]
        unseeded = [r for r, g in enumerate(generators) if g is None]
        if unseeded:
            if self.generator is None:
                self.generator = torch.Generator(device=device)
                self.generator.seed()
            batch = torch.empty(len(unseeded), self.vocab_size, device=self.generator.device)  # [U, V]
            batch.exponential_(generator=self.generator)
            noise[torch.tensor(unseeded, device=device)] = batch.to(device)
        for r, g in enumerate(generators):
            if g is not None:
                own = torch.empty(self.vocab_size, device=g.device).exponential_(generator=g)  # [V]
                noise[r] = own.to(device)
        # Exp(1) can round to 0, turning a zero-probability token into 0/0 = NaN, which argmax would pick.
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> None:
    """Set every token a row's grammar forbids to -inf, in place, on the logits' device."""
    vocab = logits.shape[1]
    # int32 words as little-endian bytes: token t is bit t % 8 of byte t // 8 ([R, 4W] uint8).
    packed = mask.bits.contiguous().view(torch.uint8)
    shifts = torch.arange(8, device=logits.device, dtype=torch.uint8)  # [8]
    allowed = ((packed.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]  # [R, V]
    index = torch.tensor(mask.rows, device=logits.device)  # [R]
    masked = logits.index_select(0, index).masked_fill_(~allowed, float("-inf"))  # [R, V]
    logits.index_copy_(0, index, masked)


def _make_plan(rows: Sequence[SamplingRow], mask: TokenMask | None = None) -> _Plan:
    plan = _Plan()
    grammar_done = {r for r, done in zip(mask.rows, mask.finished, strict=True) if done} if mask else set()
    for i, row in enumerate(rows):
        p = row.params
        (plan.greedy if p.greedy else plan.random).append(i)
        if p.logprobs is not None:
            plan.logprobs.append(i)
        if p.logit_bias:
            plan.bias.append(i)
        if (
            len(row.output_token_ids) < p.min_tokens
            and (row.eos_token_id is not None or p.stop_token_ids)
            and i not in grammar_done
        ):
            plan.min_tokens.append(i)
        if p.needs_penalties:
            plan.penalties.append(i)
        if p.banned_token_ids:
            plan.banned.append(i)
    return plan


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Logits [S, V] after logit bias, min-tokens masking and penalties (before temperature).

    Returns `logits` itself when no row needs processing, else a processed copy.
    """
    return _process(logits, rows, _make_plan(rows))


def _process(logits: torch.Tensor, rows: Sequence[SamplingRow], plan: _Plan) -> torch.Tensor:
    if not plan.processes:
        return logits
    out = logits.float().clone()  # [S, V]
    if plan.bias:
        _apply_logit_bias(out, rows, plan.bias)
    if plan.min_tokens:
        _mask_stop_tokens(out, rows, plan.min_tokens)
    if plan.penalties:
        _apply_penalties(out, rows, plan.penalties)
    if plan.banned:
        _ban(out, [(i, t) for i in plan.banned for t in rows[i].params.banned_token_ids])
    return out


def _apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow], index: list[int]) -> None:
    """Add each row's logit_bias in place; ids outside the vocabulary are ignored."""
    vocab = logits.shape[1]
    entries = [(i, t, b) for i in index for t, b in rows[i].params.logit_bias.items() if t < vocab]
    if not entries:
        return
    row_ids, token_ids, biases = zip(*entries, strict=True)
    device = logits.device
    logits.index_put_(
        (torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device)),
        torch.tensor(biases, dtype=logits.dtype, device=device),
        accumulate=True,
    )


def _ban(logits: torch.Tensor, entries: list[tuple[int, int]]) -> None:
    """Set (row, token) entries to -inf in place; tokens outside the vocabulary are ignored."""
    entries = [(i, t) for i, t in entries if 0 <= t < logits.shape[1]]
    if entries:
        row_ids, token_ids = zip(*entries, strict=True)
        device = logits.device
        logits[torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device)] = float("-inf")


def _mask_stop_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow], index: list[int]) -> None:
    """Set eos and stop_token_ids to -inf in place for rows short of min_tokens (even with ignore_eos)."""
    entries: list[tuple[int, int]] = []
    for i in index:
        row = rows[i]
        stops = (*row.params.stop_token_ids, *(() if row.eos_token_id is None else (row.eos_token_id,)))
        entries.extend((i, t) for t in stops)
    _ban(logits, entries)


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow], index: list[int]) -> None:
    """Repetition penalty over prompt and output tokens; presence and frequency over output only."""
    device = logits.device
    params = [rows[i].params for i in index]
    sel = torch.tensor(index, device=device)  # [P]
    sub = logits.index_select(0, sel)  # [P, V]
    output_counts = _token_counts([rows[i].output_token_ids for i in index], sub.shape[1], device)  # [P, V]
    if any(p.repetition_penalty != 1.0 for p in params):
        prompt_counts = _token_counts([rows[i].prompt_token_ids for i in index], sub.shape[1], device)
        seen = (prompt_counts + output_counts) > 0  # [P, V]
        rep = _column([p.repetition_penalty for p in params], sub)  # [P, 1]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        freq = _column([p.frequency_penalty for p in params], sub)  # [P, 1]
        pres = _column([p.presence_penalty for p in params], sub)  # [P, 1]
        sub = sub - freq * output_counts - pres * (output_counts > 0).to(sub.dtype)
    logits.index_copy_(0, sel, sub)


def _token_counts(seqs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each sequence, [P, V] float; ids outside [0, V) are not counted."""
    width = max((len(s) for s in seqs), default=0)
    padded = torch.full((len(seqs), width), vocab, dtype=torch.long)  # [P, L]; V marks padding
    for r, s in enumerate(seqs):
        if s:
            padded[r, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    padded = torch.where((padded >= 0) & (padded < vocab), padded, vocab).to(device)
    counts = torch.zeros(len(seqs), vocab + 1, device=device)  # [P, V + 1]; last column collects padding
    counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)  # [P, 1]


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities [R, V] to sample from: processed logits [R, V] / temperature, then min-p, top-k, top-p.

    Every row must have temperature > 0 (greedy rows never get here).
    """
    logits = logits / _column([p.temperature for p in params], logits)  # [R, V]
    if any(p.min_p > 0.0 for p in params):
        probs = torch.softmax(logits, dim=-1)  # [R, V]
        floor = _column([p.min_p for p in params], probs) * probs.amax(dim=-1, keepdim=True)  # [R, 1]
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        logits = _top_k_top_p(logits, params)
    return torch.softmax(logits, dim=-1)


def _top_k_top_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Mask to -inf everything outside each row's top_k, then outside its top_p nucleus."""
    vocab = logits.shape[1]
    ordered, order = logits.sort(dim=-1, descending=True)  # [R, V] each
    if any(p.top_k > 0 for p in params):
        ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
        kth = ordered.gather(1, torch.tensor(ks, device=logits.device).unsqueeze(1) - 1)  # [R, 1]
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))  # ties with the k-th are kept
    if any(p.top_p < 1.0 for p in params):
        probs = torch.softmax(ordered, dim=-1)  # [R, V]
        before = probs.cumsum(dim=-1) - probs  # [R, V]; mass of more likely tokens, 0 for the top one
        # A token stays while the tokens above it hold less than top_p; top_p 1 keeps all (no rounding loss).
        top_p = _column([p.top_p if p.top_p < 1.0 else float("inf") for p in params], probs)  # [R, 1]
        ordered = ordered.masked_fill(before >= top_p, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)


def prompt_logprobs(logits: torch.Tensor, target_ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """logits [n, V] at positions 0..n-1 predicting target_ids[0..n-1] (the next prompt tokens)."""
    if logits.dim() != 2 or logits.shape[0] != len(target_ids):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(target_ids)} target ids")
    raw = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    return _gather_logprobs(raw, list(target_ids), [k] * len(target_ids))


def _gather_logprobs(logprobs: torch.Tensor, token_ids: list[int], ks: list[int]) -> list[TokenLogprob]:
    """Logprob, rank and top-k alternatives of token_ids[i] in row i of `logprobs` [N, V]."""
    if not token_ids:
        return []
    ids = torch.tensor(token_ids, device=logprobs.device).unsqueeze(1)  # [N, 1]
    chosen = logprobs.gather(1, ids)  # [N, 1]
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()  # [N]; ties share the better rank
    k_max = min(max(ks), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(k_max, dim=-1)  # [N, K] each, most likely first
    top_pairs = [
        list(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), top_values.tolist(), strict=True)
    ]
    return [
        TokenLogprob(t, lp, rank, tuple(pairs[:k]))
        for t, lp, rank, pairs, k in zip(
            token_ids, chosen.squeeze(1).tolist(), ranks, top_pairs, ks, strict=True
        )
    ]
