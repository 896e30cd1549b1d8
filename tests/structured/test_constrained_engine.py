"""Constrained decoding through the engine, on a tiny random checkpoint (fp32, CPU).

Nothing but the grammar makes these outputs valid JSON: the weights are random. Every output that
ends with `finish_reason: "stop"` must validate with `jsonschema`, greedy and sampled, `n = 4`,
under preemption and after a step retried request by request; free requests batched with
constrained ones sample exactly what they sample alone.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import jsonschema
import pytest

from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from engine.structured import StructuredOutput
from tests.engine.helpers import greedy, make_engine, run, text, tokens
from tests.structured.schemas import SCHEMAS

PROMPT = [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793]  # <s>[INST] ... [/INST]
MAX_TOKENS = 200  # above the longest instance the corpus allows (about 199 bytes)
SEEDS = (1, 2, 3)


def constrained(schema: dict, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", MAX_TOKENS)
    return SamplingParams(structured=StructuredOutput.json_schema(schema), **kw)


@pytest.fixture(scope="module")
def engine(hf_dir):
    return make_engine(hf_dir, grammars=True, max_num_seqs=32, num_kv_blocks=512)


def check_valid(outs, schema: dict) -> FinishReason:
    last = outs[-1]
    if last.finish_reason is FinishReason.STOP:
        jsonschema.validate(json.loads(text(outs)), schema)
    return last.finish_reason


def test_every_schema_greedy_sampled_and_n4_gives_valid_json(engine) -> None:
    requests = {}
    for name, schema in SCHEMAS.items():
        requests[f"{name}/greedy"] = (PROMPT, constrained(schema, temperature=0.0))
        for seed in SEEDS:
            requests[f"{name}/t1-{seed}"] = (PROMPT, constrained(schema, temperature=1.0, seed=seed))
        requests[f"{name}/n4"] = (PROMPT, constrained(schema, temperature=1.0, seed=9, n=4))
    outs = run(engine, requests, max_steps=20000)
    reasons: Counter[str] = Counter()
    for (rid, _), choice in outs.items():
        reasons[check_valid(choice, SCHEMAS[rid.split("/")[0]]).value] += 1
    total = sum(reasons.values())
    assert total == len(SCHEMAS) * (1 + len(SEEDS) + 4)
    print(f"\n{total} constrained outputs: {dict(reasons)}")  # the share cut by max_tokens is reported
    assert set(reasons) <= {"stop", "length"} and reasons["stop"] >= 0.9 * total, reasons
    assert engine.scheduler.blocks.num_free_blocks == engine.config.num_kv_blocks


def test_free_requests_batched_with_constrained_ones_sample_what_they_sample_alone(engine) -> None:
    free = {
        "greedy": (PROMPT, greedy(24)),
        "seeded": (PROMPT, SamplingParams(temperature=1.0, seed=5, max_tokens=24, ignore_eos=True)),
    }
    alone = {rid: tokens(run(engine, {rid: req})[(rid, 0)]) for rid, req in free.items()}
    mixed = dict(free)
    for i, name in enumerate(("flat_record", "object_array", "pydantic_person", "int_array")):
        mixed[f"c{i}"] = (PROMPT, constrained(SCHEMAS[name], temperature=1.0, seed=i))
    outs = run(engine, mixed)
    for rid in free:
        assert tokens(outs[(rid, 0)]) == alone[rid], rid
    for i, name in enumerate(("flat_record", "object_array", "pydantic_person", "int_array")):
        check_valid(outs[(f"c{i}", 0)], SCHEMAS[name])


def test_a_step_retried_alone_and_preemption_never_advance_a_matcher_twice(hf_dir) -> None:
    names = [
        f"{n}/{seed}"
        for n in ("flat_record", "nested_object", "kitchen_sink", "ref_twice")
        for seed in (4, 5)
    ]
    requests = {
        n: (PROMPT, constrained(SCHEMAS[n.split("/")[0]], temperature=1.0, seed=int(n.split("/")[1])))
        for n in names
    }
    clean = run(make_engine(hf_dir, grammars=True), requests)
    engine = make_engine(hf_dir, grammars=True, num_kv_blocks=27)  # 216 slots: one request's 209 fit
    real_execute = engine.runner.execute
    failed = []

    def fails_every_seventh_batch(sched):
        if len(sched.chunks) > 1 and engine.num_steps % 7 == 0:
            failed.append(engine.num_steps)
            raise RuntimeError("injected fault")
        return real_execute(sched)

    engine.runner.execute = fails_every_seventh_batch
    real_sample = engine.runner.sampler

    def fails_after_the_masks(logits, rows, mask=None):  # the masks were filled: retried, filled again
        if len(rows) > 1 and engine.num_steps % 11 == 0 and mask is not None:
            failed.append(engine.num_steps)
            raise RuntimeError("injected fault after the masks")
        return real_sample(logits, rows, mask)

    engine.runner.sampler = fails_after_the_masks
    outs = run(engine, requests)
    assert failed and engine.num_retried_steps == len(failed)
    assert engine.scheduler.num_preemptions > 0
    for name in names:
        assert tokens(outs[(name, 0)]) == tokens(clean[(name, 0)]), name
        assert check_valid(outs[(name, 0)], SCHEMAS[name.split("/")[0]]) is FinishReason.STOP


def test_logprobs_are_the_masked_distributions(engine) -> None:
    params = constrained(SCHEMAS["flat_record"], temperature=0.0, logprobs=5)
    outs = run(engine, {"lp": (PROMPT, params)})[("lp", 0)]
    forced = 0
    for out in outs:
        for entry in out.logprobs:
            total = sum(math.exp(t.logprob) for t in entry.top)
            assert total <= 1 + 1e-5 and all(math.isfinite(t.logprob) for t in entry.top)
            if len(entry.top) == 1:  # the grammar allowed one token: it is certain
                forced += 1
                assert entry.logprob == pytest.approx(0.0, abs=1e-6)
    assert forced >= 3  # '{"name":"' and the other keys are forced


def test_logit_bias_cannot_unmask_a_token(engine, hf_dir) -> None:
    free = run(engine, {"f": (PROMPT, greedy(4))})[("f", 0)]
    favourite = tokens(free)[0]
    bias = {favourite: 100.0, 28705: 100.0}  # and the lone word marker
    biased = run(engine, {"f": (PROMPT, greedy(4, logit_bias=bias))})[("f", 0)]
    assert set(tokens(biased)) <= set(bias)  # free, the bias wins
    params = constrained(SCHEMAS["flat_record"], temperature=0.0, logit_bias=bias)
    outs = run(engine, {"c": (PROMPT, params)})[("c", 0)]
    assert check_valid(outs, SCHEMAS["flat_record"]) is FinishReason.STOP


def test_max_tokens_ends_with_length_and_min_tokens_gives_way_to_a_complete_grammar(engine) -> None:
    cut = run(engine, {"cut": (PROMPT, constrained(SCHEMAS["kitchen_sink"], temperature=0.0, max_tokens=5))})
    assert cut[("cut", 0)][-1].finish_reason is FinishReason.LENGTH
    assert len(tokens(cut[("cut", 0)])) == 5
    boolean = constrained(SCHEMAS["boolean"], temperature=1.0, seed=3, min_tokens=10)
    number = constrained(SCHEMAS["integer_range"], temperature=1.0, seed=3, min_tokens=3)
    outs = run(engine, {"b": (PROMPT, boolean), "i": (PROMPT, number)})
    assert check_valid(outs[("b", 0)], SCHEMAS["boolean"]) is FinishReason.STOP
    assert json.loads(text(outs[("b", 0)])) in (True, False)
    assert check_valid(outs[("i", 0)], SCHEMAS["integer_range"]) is FinishReason.STOP


def test_a_stop_string_still_ends_a_constrained_reply(engine) -> None:
    params = constrained(SCHEMAS["flat_record"], temperature=0.0, stop=[","])
    outs = run(engine, {"s": (PROMPT, params)})[("s", 0)]
    assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].stop_reason == ","
    assert text(outs).startswith('{"name":"') and "," not in text(outs)


def test_a_prefix_is_part_of_the_instance(engine, hf_dir) -> None:
    from tokenization import load_prompt_encoder

    encoder = load_prompt_encoder(hf_dir)
    prefix = '{"name":"'
    context = encoder.encode_text(prefix, bos=False)
    engine.add_request("p", PROMPT + context, constrained(SCHEMAS["flat_record"], temperature=0.0), context)
    outs = []
    while engine.has_work:
        outs += [o for o in engine.step() if o.request_id == "p"]
    assert outs[-1].finish_reason is FinishReason.STOP
    jsonschema.validate(json.loads(prefix + text(outs)), SCHEMAS["flat_record"])


def test_min_tokens_gives_way_when_a_prefix_already_completes_the_instance(engine, hf_dir) -> None:
    """The grammar allows only EOS from the first step: min_tokens must not mask it (that would
    leave no token at all)."""
    from tokenization import load_prompt_encoder

    encoder = load_prompt_encoder(hf_dir)
    prefix = '{"name":"A","age":3,"active":true}'
    context = encoder.encode_text(prefix, bos=False)
    params = constrained(SCHEMAS["flat_record"], temperature=1.0, seed=1, min_tokens=5)
    engine.add_request("done", PROMPT + context, params, context)
    outs = []
    while engine.has_work:
        outs += [o for o in engine.step() if o.request_id == "done"]
    assert outs[-1].finish_reason is FinishReason.STOP and text(outs) == ""
