"""The engine end to end on a tiny fp32 Mixtral: batching, preemption, caching, sampling, stops."""

from __future__ import annotations

import time

import pytest
import torch

from engine import fault_policy
from engine.errors import RequestRejected
from engine.fault_policy import MAX_OOM_RETRIES
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from tests.engine.helpers import EOS, greedy, make_engine, run, text, tokens

PROMPTS = {
    "a": [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793],
    "b": [1, *range(100, 141)],
    "c": [1, 415, 5565],
    "d": [1, *range(2000, 2000 + 67)],
    "e": [1, 28705, 29473, 29136, 9191, 29015],
}


@pytest.fixture(scope="module")
def alone(hf_dir):
    """Greedy tokens of each prompt generated on its own."""
    engine = make_engine(hf_dir)
    return {rid: tokens(run(engine, {rid: (p, greedy(24))})[(rid, 0)]) for rid, p in PROMPTS.items()}


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"max_num_batched_tokens": 16},  # prompts are prefilled in chunks beside decodes
        {"num_kv_blocks": 14, "block_size": 8},  # 112 slots for ~260 tokens: preemption must happen
        {"block_size": 3, "enable_prefix_caching": False},
    ],
    ids=["batched", "chunked-prefill", "preemption", "small-blocks-no-cache"],
)
def test_batched_greedy_equals_alone(hf_dir, alone, settings):
    engine = make_engine(hf_dir, **settings)
    outs = run(engine, {rid: (p, greedy(24)) for rid, p in PROMPTS.items()})
    for rid in PROMPTS:
        assert tokens(outs[(rid, 0)]) == alone[rid], rid
        assert outs[(rid, 0)][-1].finish_reason is FinishReason.LENGTH
    if "num_kv_blocks" in settings:
        assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.blocks.num_free_blocks == engine.config.num_kv_blocks


def test_prefix_cache_hit_skips_work_and_keeps_output(hf_dir, alone):
    engine = make_engine(hf_dir, block_size=4)
    run(engine, {"first": (PROMPTS["d"], greedy(24))})
    outs = run(engine, {"again": (PROMPTS["d"], greedy(24))})
    last = outs[("again", 0)][-1]
    assert last.num_cached_tokens == (len(PROMPTS["d"]) - 1) // 4 * 4
    assert tokens(outs[("again", 0)]) == alone["d"]


def test_streamed_text_equals_decoding_all_tokens(hf_dir):
    engine = make_engine(hf_dir)
    outs = run(engine, {"x": (PROMPTS["b"], greedy(40))})[("x", 0)]
    assert text(outs) == engine.output_processor.decoder.decode(tokens(outs))
    assert "\ufffd" not in text(outs) or "\ufffd" in engine.output_processor.decoder.decode(tokens(outs))


def test_stop_string_across_tokens_ends_generation_and_is_not_in_output(hf_dir):
    engine = make_engine(hf_dir)
    full = text(run(engine, {"x": (PROMPTS["b"], greedy(40))})[("x", 0)])
    stop = full[len(full) // 2 : len(full) // 2 + 5]
    assert len(stop.strip()) >= 3, full
    outs = run(engine, {"y": (PROMPTS["b"], greedy(40, stop=(stop,)))})[("y", 0)]
    assert text(outs) == full[: full.index(stop)]
    assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].stop_reason == stop


def test_eos_min_tokens_and_ignore_eos(hf_dir):
    engine = make_engine(hf_dir)
    force_eos = {EOS: 100.0}
    p = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=3, logit_bias=force_eos)
    outs = run(engine, {"eos": (PROMPTS["a"], p)})[("eos", 0)]
    assert len(tokens(outs)) == 4 and tokens(outs)[-1] == EOS and EOS not in tokens(outs)[:3]
    assert outs[-1].finish_reason is FinishReason.STOP
    p = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias=force_eos)
    outs = run(engine, {"ign": (PROMPTS["a"], p)})[("ign", 0)]
    assert tokens(outs) == [EOS] * 6 and outs[-1].finish_reason is FinishReason.LENGTH


def test_max_tokens_and_context_window(hf_dir):
    engine = make_engine(hf_dir, max_model_len=64)
    outs = run(engine, {"m": (PROMPTS["c"], greedy(7))})[("m", 0)]
    assert len(tokens(outs)) == 7 and outs[-1].finish_reason is FinishReason.LENGTH
    assert outs[-1].num_prompt_tokens == 3 and outs[-1].num_output_tokens == 7
    with pytest.raises(RequestRejected, match="maximum context length is 64 tokens") as err:
        engine.add_request("big", PROMPTS["d"], greedy(10))
    assert err.value.code == "context_length_exceeded"


def test_seeds_are_per_request(hf_dir):
    engine = make_engine(hf_dir)

    def sample(seed, others=()):
        reqs = {
            "s": (PROMPTS["b"], SamplingParams(temperature=1.0, seed=seed, max_tokens=16, ignore_eos=True))
        }
        for i, (prompt, s) in enumerate(others):
            reqs[f"o{i}"] = (prompt, SamplingParams(temperature=1.0, seed=s, max_tokens=12, ignore_eos=True))
        return tokens(run(engine, reqs)[("s", 0)])

    alone = sample(7)
    assert sample(7) == alone
    assert sample(7, others=[(PROMPTS["a"], None), (PROMPTS["d"], 3), (PROMPTS["c"], None)]) == alone
    assert sample(8) != alone


def test_n_choices_share_the_prompt_and_differ(hf_dir):
    engine = make_engine(hf_dir, block_size=4)
    p = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=10, ignore_eos=True)
    outs = run(engine, {"n": (PROMPTS["d"], p)})
    choices = [tokens(outs[("n", i)]) for i in range(3)]
    assert all(len(c) == 10 for c in choices)
    assert len({tuple(c) for c in choices}) == 3
    assert [outs[("n", i)][-1].num_cached_tokens for i in (1, 2)] == [64, 64]  # 16 full blocks reused


def test_logprobs_of_sampled_tokens_and_prompt(hf_dir, oracle):
    engine = make_engine(hf_dir)
    prompt = PROMPTS["e"]
    p = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    outs = run(engine, {"lp": (prompt, p)})[("lp", 0)]
    with torch.no_grad():
        ref = torch.log_softmax(oracle(torch.tensor([prompt + tokens(outs)])).logits[0].double(), -1)
    for i, out in enumerate(outs):
        (lp,) = out.logprobs
        pos = len(prompt) - 1 + i
        assert lp.token_id == out.new_token_ids[0] and lp.rank == 1
        assert lp.logprob == pytest.approx(ref[pos, lp.token_id].item(), abs=1e-4)
        assert [t.token_id for t in lp.top] == ref[pos].topk(2).indices.tolist()
        assert bytes(lp.bytes).decode("utf-8", "replace") == lp.token
    plp = outs[0].prompt_logprobs
    assert plp[0] is None and len(plp) == len(prompt)
    for pos in range(1, len(prompt)):
        assert plp[pos].token_id == prompt[pos]
        assert plp[pos].logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)


def test_failure_in_one_request_leaves_the_others_intact(hf_dir, alone):
    engine = make_engine(hf_dir)
    engine.add_request("bad", PROMPTS["c"], greedy(24))
    state = engine.output_processor.sequence("bad")
    real_add = state.detokenizer.add

    def explode(ids):
        if len(state.request.output_token_ids) >= 3:
            raise RuntimeError("injected fault")
        return real_add(ids)

    state.detokenizer.add = explode
    outs = run(engine, {rid: (PROMPTS[rid], greedy(24)) for rid in ("a", "b")})
    assert outs[("bad", 0)][-1].finish_reason is FinishReason.ERROR
    assert "injected fault" in outs[("bad", 0)][-1].error
    for rid in ("a", "b"):
        assert tokens(outs[(rid, 0)]) == alone[rid]
    assert engine.scheduler.blocks.num_free_blocks == engine.config.num_kv_blocks


def test_forward_that_one_request_breaks_fails_that_request_only(hf_dir, alone):
    """RELIABILITY 13 for the forward itself: a step whose forward raises because of one request
    (here: any step holding "bad" once it has 3 tokens out) is retried request by request, so
    only "bad" fails; the seeded request batched with it samples exactly what it would alone."""
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=24)
    clean = run(make_engine(hf_dir), {"s": (PROMPTS["e"], seeded)})[("s", 0)]
    engine = make_engine(hf_dir)
    real_execute = engine.runner.execute
    calls = []  # (requests in the forward, whether it raised)

    def breaks_on_bad(sched):
        bad = [c for c in sched.chunks if c.request.request_id == "bad"]
        calls.append((len(sched.chunks), bool(bad) and bad[0].request.num_output_tokens >= 3))
        if calls[-1][1]:
            raise RuntimeError("injected fault")
        return real_execute(sched)

    engine.runner.execute = breaks_on_bad
    requests = {"a": (PROMPTS["a"], greedy(24)), "b": (PROMPTS["b"], greedy(24))}
    requests |= {"bad": (PROMPTS["c"], greedy(24)), "s": (PROMPTS["e"], seeded)}
    outs = run(engine, requests)
    bad = outs[("bad", 0)]
    assert tokens(bad) == alone["c"][:3]
    assert bad[-1].finish_reason is FinishReason.ERROR and bad[-1].error_code == "internal_error"
    assert "injected fault" in bad[-1].error
    for rid in ("a", "b"):
        assert tokens(outs[(rid, 0)]) == alone[rid]
        assert outs[(rid, 0)][-1].finish_reason is FinishReason.LENGTH
    assert tokens(outs[("s", 0)]) == tokens(clean)
    first = next(i for i, (_, raised) in enumerate(calls) if raised)
    assert calls[first] == (4, True) and [n for n, _ in calls[first + 1 : first + 6]] == [1, 1, 1, 1, 3]
    assert sum(raised for _, raised in calls) == 2  # the batch, then "bad" alone; never again
    assert engine.num_retried_steps == 1 and engine.scheduler.num_preemptions == 0
    assert (
        "bad" not in engine.output_processor
        and engine.scheduler.blocks.num_free_blocks == engine.config.num_kv_blocks
    )


def test_forwards_that_fail_at_a_batch_size_shrink_the_batch_then_regrow(hf_dir, alone, monkeypatch):
    """A fault that comes with the batch (any forward of 3 or more requests raises) rather than
    with a request: each request runs alone every time, so after two such steps in a row the
    engine halves the requests per step (16 -> 8 -> 4 -> 2, requeueing what runs beyond the cap),
    tokens unchanged. After STEPS_BEFORE_REGROW clean steps the cap doubles again."""
    monkeypatch.setattr(fault_policy, "STEPS_BEFORE_REGROW", 10)
    engine = make_engine(hf_dir)  # max_num_seqs 16
    real_execute = engine.runner.execute
    sizes = []
    caps = []

    def breaks_at_three(sched):
        sizes.append(len(sched.chunks))
        caps.append(engine.scheduler.max_batch)
        if len(sched.chunks) >= 3:
            raise RuntimeError("injected fault at this batch size")
        return real_execute(sched)

    engine.runner.execute = breaks_at_three
    outs = run(engine, {rid: (p, greedy(24)) for rid, p in PROMPTS.items()})
    assert {rid: tokens(outs[(rid, 0)]) for rid in PROMPTS} == alone
    failed = [i for i, n in enumerate(sizes) if n >= 3]  # each followed by its requests alone
    assert engine.num_retried_steps == len(failed)
    assert [caps[i] for i in failed[:6]] == [16, 16, 8, 8, 4, 4]  # halved after two in a row
    shrunk = caps.index(2)
    assert shrunk == failed[5] + 1 + sizes[failed[5]]  # right after the sixth step's retries
    assert 4 in caps[shrunk:]  # after 10 clean steps at 2 the cap doubles again
    assert all(caps[i] == 4 for i in failed[6:])  # where the fault shrinks it back
    assert engine.scheduler.blocks.num_free_blocks == engine.config.num_kv_blocks


def test_out_of_memory_in_a_step_is_retried_and_output_is_unchanged(hf_dir, alone):
    """RELIABILITY 14: torch.OutOfMemoryError injected in the runner: in the first (batched)
    prefill step, then again when "d" is retried alone. The step is retried request by request;
    "d" is requeued (its KV dropped) and recomputed later; every output is unchanged."""
    engine = make_engine(hf_dir)
    real_execute = engine.runner.execute
    calls = []

    def flaky(sched):
        calls.append([c.request.request_id for c in sched.chunks])
        if len(calls) == 1 or calls[-1] == ["d"] and calls.count(["d"]) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_execute(sched)

    engine.runner.execute = flaky
    outs = run(engine, {rid: (p, greedy(24)) for rid, p in PROMPTS.items()})
    assert {rid: tokens(outs[(rid, 0)]) for rid in PROMPTS} == alone
    assert all(outs[(rid, 0)][-1].finish_reason is FinishReason.LENGTH for rid in PROMPTS)
    assert calls[1:6] == [[rid] for rid in PROMPTS]  # the first step, one request at a time
    assert engine.num_retried_steps == 1 and engine.scheduler.num_preemptions == 1  # "d" alone
    assert engine.scheduler.max_batch == engine.config.max_num_seqs  # one failure: no shrinking
    assert engine.scheduler.blocks.num_free_blocks == engine.config.num_kv_blocks


def test_request_that_keeps_running_out_of_memory_fails_and_others_go_on(hf_dir, alone):
    """Any forward holding "d" runs out of memory, even a short one's neighbours: the batch is
    retried request by request, so only "d" is requeued, and it fails on its third time alone."""
    engine = make_engine(hf_dir)
    real_execute = engine.runner.execute

    ooms = []

    def oom_with_d(sched):
        if any(c.request.request_id == "d" for c in sched.chunks):
            ooms.append(len(sched.chunks))
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_execute(sched)

    engine.runner.execute = oom_with_d
    outs = run(engine, {rid: (p, greedy(24)) for rid, p in PROMPTS.items()})
    d = outs[("d", 0)]
    assert d[-1].finish_reason is FinishReason.ERROR and d[-1].error_code == "out_of_memory"
    assert "OutOfMemoryError" in d[-1].error
    assert ooms.count(1) == MAX_OOM_RETRIES + 1  # retried twice alone, failed on the third
    assert not any(rid in engine.output_processor for rid in "abcde") and not engine.has_work
    for rid in ("a", "b", "c", "e"):  # never requeued, never blamed
        assert tokens(outs[(rid, 0)]) == alone[rid]
    assert engine.scheduler.num_preemptions == MAX_OOM_RETRIES
    assert engine.scheduler.blocks.num_free_blocks == engine.config.num_kv_blocks


def test_out_of_memory_after_sampling_keeps_seeded_tokens_and_prompt_logprobs(hf_dir):
    """The step fails after the sampler drew its random numbers (seeded generators advanced) and
    after some prompt chunks gathered logprobs: the retried request samples the same tokens and
    reports each prompt logprob once."""
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=8, prompt_logprobs=1)
    requests = {"s": (PROMPTS["d"], params)}  # 68 prompt tokens, chunks of 16
    clean = run(make_engine(hf_dir, max_num_batched_tokens=16), requests)[("s", 0)]
    engine = make_engine(hf_dir, max_num_batched_tokens=16)
    real_sampler = engine.runner.sampler
    calls = {"n": 0}

    def sample_then_fail(logits, rows, mask=None):
        result = real_sampler(logits, rows, mask)  # generators advanced
        calls["n"] += 1
        if calls["n"] == 2:  # a decode step (2 of the request's MAX_OOM_RETRIES with the one below)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return result

    engine.runner.sampler = sample_then_fail
    failing_prefill = {"n": 0}
    real_execute = engine.runner.execute

    def fail_second_chunk(sched):
        failing_prefill["n"] += 1
        if failing_prefill["n"] == 2:  # prompt chunk 2 of 5: chunk 1's logprobs are already kept
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_execute(sched)

    engine.runner.execute = fail_second_chunk
    got = run(engine, requests)[("s", 0)]
    assert tokens(got) == tokens(clean) and calls["n"] == len(clean) + 1
    assert len(got[0].prompt_logprobs) == len(clean[0].prompt_logprobs) == len(PROMPTS["d"])
    assert [e and e.logprob for e in got[0].prompt_logprobs] == pytest.approx(
        [e and e.logprob for e in clean[0].prompt_logprobs], abs=1e-5
    )


def test_queue_timeout_outputs_survive_a_failing_step_and_started_n_requests_are_kept(hf_dir):
    # An overdue request expires in the same step that then runs out of memory: its output is
    # still delivered (a waiter must never hang).
    engine = make_engine(hf_dir, max_num_seqs=1, max_queue_time_s=5.0)
    engine.add_request("a", PROMPTS["a"], greedy(4))
    engine.step()
    engine.add_request("late", PROMPTS["b"], greedy(4), arrival_time=time.monotonic() - 10)
    real_execute = engine.runner.execute
    engine.runner.execute = lambda sched: (_ for _ in ()).throw(torch.OutOfMemoryError("injected"))
    (out,) = engine.step()
    assert out.request_id == "late" and out.finish_reason is FinishReason.QUEUE_TIMEOUT
    assert out.queue_time >= 10
    engine.runner.execute = real_execute
    assert tokens(run(engine, {})[("a", 0)])  # "a" was requeued and finishes
    # n = 2 without the prefix cache: choice 0 runs in the only slot while choice 1 waits past the
    # bound. The request has started, so choice 1 is not dropped: it runs after choice 0.
    engine = make_engine(hf_dir, max_num_seqs=1, max_queue_time_s=5.0, enable_prefix_caching=False)
    engine.add_request("n2", PROMPTS["c"], SamplingParams(temperature=0.0, max_tokens=4, n=2))
    engine.step()
    for choice in engine.output_processor.choices("n2"):
        choice.arrival_time -= 10
    outs = run(engine, {})
    assert [o[-1].finish_reason for o in outs.values()] == [FinishReason.LENGTH] * 2


def test_request_waiting_past_the_queue_bound_is_dropped_before_any_work(hf_dir, alone):
    """RELIABILITY 2: one running slot; "late" (n = 2) arrived 10 s ago and never started: dropped
    at the next step with QUEUE_TIMEOUT for both choices and no tokens; "fresh" waits and runs."""
    engine = make_engine(hf_dir, max_num_seqs=1, max_queue_time_s=5.0)
    engine.add_request("a", PROMPTS["a"], greedy(24))
    engine.step()  # "a" takes the only slot
    now = time.monotonic()
    engine.add_request(
        "late", PROMPTS["b"], SamplingParams(temperature=0.0, max_tokens=4, n=2), arrival_time=now - 10
    )
    engine.add_request("fresh", PROMPTS["c"], greedy(24), arrival_time=now)
    outs = run(engine, {})
    late = [out for key, o in outs.items() if key[0] == "late" for out in o]
    assert sorted(o.index for o in late) == [0, 1]
    assert all(
        o.finish_reason is FinishReason.QUEUE_TIMEOUT and o.finished and not o.new_token_ids for o in late
    )
    assert "waited more than 5 s" in late[0].error
    assert tokens(outs[("fresh", 0)]) == alone["c"] and tokens(outs[("a", 0)]) == alone["a"][1:]
    assert engine.scheduler.blocks.num_free_blocks == engine.config.num_kv_blocks
    # A request that started is never dropped for its age, even when preempted back to the queue.
    engine.add_request("started", PROMPTS["e"], greedy(24))
    engine.step()
    (started,) = engine.output_processor.choices("started")
    started.arrival_time -= 100  # as if it had been running for 100 s
    engine.scheduler.requeue([started])
    assert engine.scheduler.waiting[0] is started
    outs = run(engine, {})
    assert tokens(outs[("started", 0)]) == alone["e"][1:]  # its first token came from the step above


def test_abort_frees_blocks_at_once(hf_dir):
    engine = make_engine(hf_dir)
    engine.add_request("x", PROMPTS["d"], greedy(50))
    engine.add_request("y", PROMPTS["b"], greedy(50))
    for _ in range(3):
        engine.step()
    engine.abort("x")
    assert not any(r.request_id == "x" for r in engine.scheduler.running)
    engine.scheduler.blocks.check_invariants(engine.scheduler.running)
    engine.abort("y")
    assert engine.scheduler.blocks.num_free_blocks == engine.config.num_kv_blocks
    assert not engine.has_work


def test_prompt_logprobs_are_complete_when_the_prefix_is_cached(hf_dir):
    engine = make_engine(hf_dir, block_size=4)
    p = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=1)
    first = run(engine, {"a": (PROMPTS["d"], p)})[("a", 0)][0].prompt_logprobs
    again = run(engine, {"b": (PROMPTS["d"], p)})[("b", 0)][0].prompt_logprobs
    assert len(first) == len(again) == len(PROMPTS["d"])
    assert [e.token_id for e in again[1:]] == PROMPTS["d"][1:]
    for x, y in zip(first[1:], again[1:], strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
