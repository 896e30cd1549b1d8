"""Structured output's cost: constrained against free decoding, mask time, time to the first mask.

    python -m bench.structured                        # 1, 8, 32 clients on the "small" checkpoint
    python -m bench.structured --clients 1,8 --rounds 1

PERFORMANCE.md's "small" random Mixtral (bf16, CPU), driven through the engine itself (no HTTP),
with Mistral's v1 tokenizer and the schema corpus of `tests/structured/schemas.py`. In one run:
1. Throughput at each client count (a closed loop: that many requests in flight, 64-token
   prompts). Every request constrained (each a schema of the corpus in turn, sampled at
   temperature 1 with its own seed) against none: the free run replays the constrained run's
   requests with exactly the output lengths those had (`min_tokens` = `max_tokens`,
   `ignore_eos`), so both runs do the same steps over the same batch shapes; only the grammar
   work differs (prefix caching is off, so the replay computes its prompts again). The median
   of `--rounds` alternating pairs; the ratio is constrained / free. Target (the issue's): at
   most 10% loss at 32 clients. A last row at the top client count gives every request a
   schema of 40 numbers (about 140 tokens a reply), so that decode steps, where the grammar's
   share is largest, dominate.
2. Grammar time per step in the constrained runs, as a share of the step: filling the masks,
   applying them to the logits, and advancing the matchers.
3. Time from arrival to the first mask, per schema (p50/p99 over the corpus), cold (an empty
   grammar cache: the compile is part of it) and cached, on an idle engine: the request is
   added (compiled unless cached), prefilled, and its first mask filled.
4. The grammar engines on the corpus, behind our interface's two operations: llguidance
   (the one we serve with) against xgrammar where it is installed: compile time per schema, and
   the time to fill one mask along each schema's sample instance.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.small_checkpoint import write_small_checkpoint
from engine import sampler as sampler_module
from engine.config import EngineConfig
from engine.factory import grammar_compiler
from engine.llm_engine import Engine
from engine.output_processor import OutputProcessor
from engine.sampling_params import SamplingParams
from engine.structured import GrammarCompiler, StructuredOutput
from engine.structured.llguidance_backend import LLGuidanceBackend
from model.loader import load_model
from tests.structured.schemas import SAMPLE_INSTANCES, SCHEMAS
from tokenization.loader import load_prompt_encoder
from tokenization.vocabulary import TokenVocabulary

PROMPT_LEN = 64
MAX_TOKENS = 200


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class GrammarClock:
    """Seconds spent in the grammar's parts of the engine, wrapped around the engine's own calls."""

    fill: float = 0.0
    apply: float = 0.0
    advance: float = 0.0
    steps: float = 0.0
    first_mask: dict[str, float] = field(default_factory=dict)  # request id -> when its first mask was filled

    @property
    def grammar(self) -> float:
        return self.fill + self.apply + self.advance


def timed(clock: GrammarClock, part: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(clock, part, getattr(clock, part) + time.perf_counter() - start)

    return wrapper


@contextmanager
def instrumented(engine: Engine, clock: GrammarClock):
    """Times the mask fill, the mask's application and the matchers' advance, and notes when each
    request's first mask was filled."""
    fill = engine.runner._grammar_masks
    assert fill is not None

    def fill_noting_first(sequence_ids):
        start = time.perf_counter()
        try:
            return fill(sequence_ids)
        finally:
            now = time.perf_counter()
            clock.fill += now - start
            for sid in sequence_ids:
                clock.first_mask.setdefault(sid, now)

    real_apply, real_advance = sampler_module.apply_token_mask, OutputProcessor._advance
    engine.runner._grammar_masks = fill_noting_first
    sampler_module.apply_token_mask = timed(clock, "apply", real_apply)
    OutputProcessor._advance = staticmethod(timed(clock, "advance", real_advance))  # type: ignore[method-assign]
    try:
        yield
    finally:
        engine.runner._grammar_masks = fill
        sampler_module.apply_token_mask = real_apply
        OutputProcessor._advance = staticmethod(real_advance)  # type: ignore[method-assign]


@dataclass(frozen=True)
class Job:
    prompt: list[int]
    params: SamplingParams


def closed_loop(
    engine: Engine, jobs: list[Job], clients: int, clock: GrammarClock
) -> tuple[float, list[int]]:
    """Run `jobs` with `clients` in flight; output tok/s and each job's output length."""
    lengths = [0] * len(jobs)
    next_job = 0
    in_flight: dict[str, int] = {}
    start = time.perf_counter()
    while next_job < len(jobs) or in_flight:
        while next_job < len(jobs) and len(in_flight) < clients:
            rid = f"job{next_job}-{time.monotonic_ns()}"
            engine.add_request(rid, jobs[next_job].prompt, jobs[next_job].params)
            in_flight[rid] = next_job
            next_job += 1
        step_start = time.perf_counter()
        outputs = engine.step()
        clock.steps += time.perf_counter() - step_start
        for out in outputs:
            lengths[in_flight[out.request_id]] += len(out.new_token_ids)
            if out.finished:
                del in_flight[out.request_id]
    wall = time.perf_counter() - start
    return sum(lengths) / wall, lengths


# Long replies: a list of 40 numbers, about 140 tokens of decode a reply (the corpus's are 15 to 25).
LONG_REPLY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 40,
              "maxItems": 40}  # fmt: skip
LONG = {"long_reply": LONG_REPLY}


def constrained_jobs(count: int, seed: int, schemas: dict[str, dict] | None = None) -> list[Job]:
    rng = random.Random(seed)
    schemas = SCHEMAS if schemas is None else schemas
    names = sorted(schemas)
    return [
        Job(
            [1] + [rng.randrange(100, 31000) for _ in range(PROMPT_LEN - 1)],
            SamplingParams(
                temperature=1.0,
                seed=seed * 1000 + i,
                max_tokens=MAX_TOKENS,
                structured=StructuredOutput.json_schema(schemas[names[i % len(names)]]),
            ),
        )
        for i in range(count)
    ]


def free_jobs(jobs: list[Job], lengths: list[int]) -> list[Job]:
    return [
        Job(
            j.prompt,
            SamplingParams(temperature=1.0, seed=j.params.seed, max_tokens=n, min_tokens=n, ignore_eos=True),
        )
        for j, n in zip(jobs, lengths, strict=True)
    ]


@dataclass(frozen=True)
class ThroughputRow:
    clients: int
    free: float
    constrained: float
    grammar_share: float  # of the constrained runs' step time
    fill_share: float
    apply_share: float
    advance_share: float
    tokens: int


def throughput(
    engine: Engine, clients: int, rounds: int, jobs_per_client: int, schemas: dict[str, dict] | None = None
) -> ThroughputRow:
    frees, constraineds, clocks, total = [], [], [], 0
    for r in range(rounds):
        jobs = constrained_jobs(max(clients * jobs_per_client, 8), seed=100 * clients + r, schemas=schemas)
        clock = GrammarClock()
        with instrumented(engine, clock):
            constrained, lengths = closed_loop(engine, jobs, clients, clock)
        free, _ = closed_loop(engine, free_jobs(jobs, lengths), clients, GrammarClock())
        constraineds.append(constrained)
        frees.append(free)
        clocks.append(clock)
        total += sum(lengths)
    steps = sum(c.steps for c in clocks)
    return ThroughputRow(
        clients,
        statistics.median(frees),
        statistics.median(constraineds),
        sum(c.grammar for c in clocks) / steps,
        sum(c.fill for c in clocks) / steps,
        sum(c.apply for c in clocks) / steps,
        sum(c.advance for c in clocks) / steps,
        total,
    )


def first_mask_times(engine: Engine, compiler: GrammarCompiler, rng: random.Random) -> dict[str, list[float]]:
    """Arrival to first mask per schema, cold then cached, and the compile time alone, in ms."""
    times: dict[str, list[float]] = {"cold": [], "cached": [], "compile": []}
    for phase in ("cold", "cached"):
        for name in sorted(SCHEMAS):
            spec = StructuredOutput.json_schema(SCHEMAS[name])
            prompt = [1] + [rng.randrange(100, 31000) for _ in range(PROMPT_LEN - 1)]
            params = SamplingParams(temperature=0.0, max_tokens=1, structured=spec)
            clock = GrammarClock()
            rid = f"{phase}-{name}"
            compiles = compiler.num_compiled
            with instrumented(engine, clock):
                arrival = time.perf_counter()
                engine.add_request(rid, prompt, params)
                compiled = time.perf_counter()
                while engine.has_work:
                    engine.step()
            assert (compiler.num_compiled > compiles) == (phase == "cold"), (phase, name)
            times[phase].append(1000 * (clock.first_mask[rid] - arrival))
            if phase == "cold":
                times["compile"].append(1000 * (compiled - arrival))
    return times


@dataclass(frozen=True)
class EngineRow:
    name: str
    compile_ms: list[float]
    mask_us: list[float]
    tokens_checked: int


def llguidance_row(vocab: TokenVocabulary, vocab_size: int) -> EngineRow:
    backend = LLGuidanceBackend(vocab, vocab_size)
    compile_ms, mask_us, checked = [], [], 0
    row = np.zeros(backend.mask_words, dtype=np.int32)
    for name in sorted(SCHEMAS):
        start = time.perf_counter()
        grammar = backend.compile(StructuredOutput.json_schema(SCHEMAS[name]))
        compile_ms.append(1000 * (time.perf_counter() - start))
        matcher = grammar.matcher()
        for token in vocab.exact_tokenize(json.dumps(SAMPLE_INSTANCES[name], separators=(",", ":"))):
            start = time.perf_counter()
            matcher.fill_bitmask(row)
            mask_us.append(1e6 * (time.perf_counter() - start))
            assert row[token // 32] >> (token % 32) & 1, (name, token)
            assert matcher.accept(token)
            checked += 1
    return EngineRow("llguidance", compile_ms, mask_us, checked)


def xgrammar_row(vocab: TokenVocabulary, vocab_size: int) -> EngineRow | str:
    """xgrammar on the same vocabulary bytes (special tokens given as empty, its convention), the
    same schemas (compact JSON, strict) and the same token paths; a reason if it is not installed.
    A schema xgrammar cannot compile, or whose sample instance it refuses, is named in the row."""
    try:
        import xgrammar as xgr
    except ImportError:
        return "xgrammar is not installed (pip install xgrammar): not measured"
    encoded = [b"" if t in vocab.special_ids else data for t, data in enumerate(vocab.tokens)]
    info = xgr.TokenizerInfo(
        encoded, vocab_type=xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[vocab.eos_id]
    )
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    compile_ms, mask_us, checked, failed = [], [], 0, []
    for name in sorted(SCHEMAS):
        start = time.perf_counter()
        try:
            compiled = compiler.compile_json_schema(
                json.dumps(SCHEMAS[name]), any_whitespace=False, separators=(",", ":"), strict_mode=True
            )
        except Exception:  # noqa: BLE001 - any refusal is a result to report
            failed.append(f"{name} (compile)")
            continue
        compile_ms.append(1000 * (time.perf_counter() - start))
        matcher = xgr.GrammarMatcher(compiled)
        for token in vocab.exact_tokenize(json.dumps(SAMPLE_INSTANCES[name], separators=(",", ":"))):
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            mask_us.append(1e6 * (time.perf_counter() - start))
            if not matcher.accept_token(token):
                failed.append(f"{name} (refused its valid instance)")
                break
            checked += 1
    version = importlib.metadata.version("xgrammar")
    label = f"xgrammar {version}" + (f"; failed on {', '.join(failed)}" if failed else "")
    return EngineRow(label, compile_ms, mask_us, checked)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--rounds", type=int, default=2, help="alternating free/constrained pairs per level")
    p.add_argument("--jobs-per-client", type=int, default=3)
    p.add_argument("--checkpoint", type=Path, help="default: the small checkpoint, written to a temp dir")
    opts = p.parse_args(argv)
    torch.set_num_threads(2)
    levels = [int(c) for c in opts.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = opts.checkpoint or write_small_checkpoint(Path(tmp) / "small")
        print(f"# structured output: small checkpoint, bf16, {torch.get_num_threads()} threads", flush=True)
        model = load_model(checkpoint, dtype="bfloat16")
        encoder = load_prompt_encoder(checkpoint)
        compiler = grammar_compiler(encoder, model)
        config = EngineConfig(
            max_model_len=PROMPT_LEN + MAX_TOKENS, num_kv_blocks=2048, block_size=16,
            max_num_seqs=max(levels), max_num_batched_tokens=2048,
            enable_prefix_caching=False,  # the free run replays the constrained run's prompts
        )  # fmt: skip
        engine = Engine(model, config, encoder, encoder.eos_id, grammars=compiler)
        closed_loop(engine, constrained_jobs(4, seed=0), 4, GrammarClock())  # warm-up
        engine.grammars = empty = GrammarCompiler(compiler.backend)  # nothing cached
        times = first_mask_times(engine, empty, random.Random(0))
        engine.grammars = compiler
        print("\n| clients | free tok/s | constrained tok/s | ratio | grammar share of step "
              "(fill / apply / advance) | tokens |")  # fmt: skip
        print("|---:|---:|---:|---:|---|---:|")
        runs = [(str(c), c, None) for c in levels] + [(f"{max(levels)}, long replies", max(levels), LONG)]
        for label, clients, schemas in runs:
            row = throughput(engine, clients, opts.rounds, opts.jobs_per_client, schemas)
            parts = (row.fill_share, row.apply_share, row.advance_share)
            shares = " / ".join(f"{100 * x:.1f}" for x in parts)
            ratio = row.constrained / row.free
            print(
                f"| {label} | {row.free:.1f} | {row.constrained:.1f} | {ratio:.2f}x"
                f" | {100 * row.grammar_share:.1f}% ({shares}) | {row.tokens} |",
                flush=True,
            )
        print(f"\n## arrival to first mask, {len(SCHEMAS)} schemas, idle engine (ms)\n")
        print("| | p50 | p99 |\n|---|---:|---:|")
        for label, key in (
            ("compile (cold)", "compile"),
            ("first mask, cold", "cold"),
            ("first mask, cached", "cached"),
        ):
            print(f"| {label} | {pct(times[key], 0.5):.2f} | {pct(times[key], 0.99):.2f} |")
        vocab = compiler.backend.vocab  # type: ignore[attr-defined]
        rows = [llguidance_row(vocab, model.config.vocab_size), xgrammar_row(vocab, model.config.vocab_size)]
        print(f"\n## grammar engines on the corpus ({len(SCHEMAS)} schemas, v1 vocabulary)\n")
        print("| engine | compile p50 ms | compile p99 ms | mask p50 us | mask p99 us | masks |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in rows:
            if isinstance(row, str):
                print(f"| {row} | | | | | |")
                continue
            print(
                f"| {row.name} | {pct(row.compile_ms, 0.5):.2f} | {pct(row.compile_ms, 0.99):.2f} "
                f"| {pct(row.mask_us, 0.5):.0f} | {pct(row.mask_us, 0.99):.0f} | {row.tokens_checked} |"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
