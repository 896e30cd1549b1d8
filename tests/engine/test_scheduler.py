"""Scheduler and block manager, driven by a fake model whose next token depends on the prefix only.

Because the fake model is a pure function of the tokens so far, every request must produce the
same tokens whatever the pool size, budget, chunking, preemption or prefix caching does to the
schedule; and after everything ends, every block must be free with no reference left.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import EngineConfig
from engine.request import FinishReason, Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput

EOS = 2


def fake_next_token(token_ids: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(token_ids[-8:])) * 31 + len(token_ids)) % 997 + 3


def make_request(rid: str, prompt: list[int], max_tokens: int, max_model_len: int = 4096) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0), EOS, max_model_len)


def run_step(s: Scheduler, check_budget: bool = True) -> SchedulerOutput:
    out = s.schedule()
    if check_budget:
        assert out.num_tokens <= s.config.max_num_batched_tokens
        assert len(out.chunks) <= s.config.max_num_seqs
    for c in out.chunks:  # every chunk must have exactly the blocks it writes
        assert len(c.block_ids) * s.config.block_size >= c.num_computed + len(c.token_ids)
        assert len(set(c.block_ids)) == len(c.block_ids)
    sampled = {
        c.request.request_id: fake_next_token(list(c.request.token_ids)) for c in out.chunks if c.sample
    }
    s.update(out, sampled)
    s.blocks.check_invariants(s.running)
    return out


def run_to_completion(s: Scheduler, requests: list[Request], max_steps: int = 10_000) -> dict[str, list[int]]:
    for r in requests:
        s.add(r)
    for _ in range(max_steps):
        if not s.has_work:
            break
        run_step(s)
    assert not s.has_work
    return {r.request_id: r.output_token_ids for r in requests}


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    toks = list(prompt)
    for _ in range(max_tokens):
        toks.append(fake_next_token(toks))
    return toks[len(prompt) :]


def prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(rng.randrange(1, 60))] for _ in range(count)]


def test_outputs_equal_one_at_a_time_under_pressure_chunking_and_preemption():
    ps = prompts(0, 12)
    # 22 blocks hold the largest request (59 + 20 tokens) alone, far from all twelve at once.
    cfg = EngineConfig(
        max_model_len=256, num_kv_blocks=22, block_size=4, max_num_seqs=6, max_num_batched_tokens=24
    )
    s = Scheduler(cfg)
    reqs = [make_request(f"r{i}", p, 20) for i, p in enumerate(ps)]
    outs = run_to_completion(s, reqs)
    for r, p in zip(reqs, ps, strict=True):
        assert outs[r.request_id] == reference_output(p, 20)
        assert r.finish_reason is FinishReason.LENGTH
    assert s.num_preemptions > 0, "the pool is sized so that preemption must happen"
    assert s.blocks.num_free_blocks == cfg.num_kv_blocks


def test_prefix_cache_hits_skip_computation_and_keep_output():
    cfg = EngineConfig(max_model_len=256, num_kv_blocks=64, block_size=4)
    s = Scheduler(cfg)
    system = list(range(10, 40))  # 30 shared tokens = 7 full blocks
    first = make_request("a", [*system, 5, 6], 4)
    run_to_completion(s, [first])
    assert first.num_cached_tokens == 0
    second = make_request("b", [*system, 7, 8, 9], 4)
    computed = []
    s.add(second)
    while s.has_work:
        computed.append(run_step(s).num_tokens)
    assert second.num_cached_tokens == 28  # 7 blocks of the shared system prompt
    assert computed[0] == len(second.prompt_token_ids) - 28
    assert second.output_token_ids == reference_output(second.prompt_token_ids, 4)


def test_fully_cached_prompt_still_computes_its_last_token():
    cfg = EngineConfig(max_model_len=64, num_kv_blocks=32, block_size=4)
    s = Scheduler(cfg)
    prompt = list(range(3, 11))  # exactly 2 blocks
    run_to_completion(s, [make_request("a", prompt, 3)])
    again = make_request("b", prompt, 3)
    s.add(again)
    assert run_step(s).num_tokens == 4  # block 2 is cached too, but its last token must be recomputed
    assert again.num_cached_tokens == 4


def test_chunked_prefill_respects_the_budget_and_decodes_keep_going():
    cfg = EngineConfig(max_model_len=512, num_kv_blocks=200, block_size=8, max_num_batched_tokens=16)
    s = Scheduler(cfg)
    short = make_request("short", [5, 6, 7], 30)
    s.add(short)
    run_step(s)
    long = make_request("long", list(range(3, 103)), 2)
    s.add(long)
    steps = 0
    while not long.prompt_computed:
        out = run_step(s)
        steps += 1
        assert any(c.request is short and len(c.token_ids) == 1 for c in out.chunks), "decode starved"
    assert steps == -(-100 // 15)  # 15 prompt tokens per step beside the one decode token


def test_max_num_seqs_limits_running():
    cfg = EngineConfig(max_model_len=64, num_kv_blocks=100, block_size=4, max_num_seqs=3)
    s = Scheduler(cfg)
    for i in range(7):
        s.add(make_request(f"r{i}", [3 + i, 4], 5))
    out = run_step(s)
    assert len(out.chunks) == 3 and len(s.running) == 3 and len(s.waiting) == 4


def test_lowering_the_batch_cap_requeues_the_latest_and_keeps_outputs():
    """The engine lowers the cap mid-run: the requests admitted last are requeued (blocks freed),
    only the first ones run, nobody is admitted beyond the cap, and every output is still the
    reference."""
    cfg = EngineConfig(max_model_len=64, num_kv_blocks=100, block_size=4, max_num_seqs=6)
    s = Scheduler(cfg)
    reqs = [make_request(f"r{i}", [3 + i, 4, 5], 6) for i in range(8)]
    for r in reqs:
        s.add(r)
    assert len(run_step(s).chunks) == 6
    requeued = s.set_max_batch(2)
    assert [r.request_id for r in requeued] == ["r2", "r3", "r4", "r5"]
    assert [r.request_id for r in s.waiting] == ["r2", "r3", "r4", "r5", "r6", "r7"]
    assert all(not r.block_ids for r in requeued)
    while s.has_work:
        out = run_step(s)
        assert 1 <= len(out.chunks) <= 2 and len(s.running) <= 2
    for r in reqs:
        assert r.output_token_ids == reference_output([3 + int(r.request_id[1:]), 4, 5], 6)
    assert s.blocks.num_free_blocks == cfg.num_kv_blocks


def test_abort_frees_blocks_at_once():
    cfg = EngineConfig(max_model_len=64, num_kv_blocks=20, block_size=4)
    s = Scheduler(cfg)
    r = make_request("a", list(range(3, 20)), 10)
    s.add(r)
    run_step(s)
    assert s.blocks.num_free_blocks < 20
    s.finish(r, FinishReason.ABORT)
    assert s.blocks.num_free_blocks == 20 and not s.has_work
    s.blocks.check_invariants([])


def test_eos_stop_token_and_context_window():
    cfg = EngineConfig(max_model_len=12, num_kv_blocks=20, block_size=4)
    s = Scheduler(cfg)
    prompt = [5, 6, 7]
    expected = reference_output(prompt, 3)
    stop_at = Request("s", prompt, SamplingParams(stop_token_ids=(expected[1],), max_tokens=50), EOS, 12)
    window = make_request("w", prompt, 50, max_model_len=12)
    run_to_completion(s, [stop_at, window])
    assert stop_at.output_token_ids == expected[:2] and stop_at.finish_reason is FinishReason.STOP
    assert stop_at.stop_reason == expected[1]
    assert window.num_tokens == 12 and window.finish_reason is FinishReason.LENGTH


def test_n_siblings_share_the_prompt_blocks():
    cfg = EngineConfig(max_model_len=128, num_kv_blocks=64, block_size=4)
    s = Scheduler(cfg)
    prompt = list(range(3, 23))  # 20 tokens = 5 blocks
    first = make_request("x-0", prompt, 3)
    others = [make_request(f"x-{i}", prompt, 3) for i in (1, 2)]
    for o in others:
        o.wait_for = first
    run_to_completion(s, [first, *others])
    assert [o.num_cached_tokens for o in others] == [16, 16]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(12, 40),
    block_size=st.sampled_from([1, 2, 4, 16]),
    budget=st.integers(8, 64),
    ops=st.lists(st.sampled_from(["add", "step", "step", "step", "abort"]), min_size=5, max_size=60),
)
def test_block_accounting_never_leaks(seed, num_blocks, block_size, budget, ops):
    """Any mix of finished, aborted and preempted requests leaves every block free, refs zero."""
    rng = random.Random(seed)
    cfg = EngineConfig(
        max_model_len=10 * block_size,
        num_kv_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=8,
        max_num_batched_tokens=budget,
    )
    s = Scheduler(cfg)
    live: list[Request] = []
    shared = [rng.randrange(3, 50) for _ in range(3 * block_size)]
    for k, op in enumerate(ops):
        if op == "add":
            prompt = (shared if rng.random() < 0.5 else [])[: rng.randrange(0, 3 * block_size)]
            prompt = prompt + [rng.randrange(3, 50) for _ in range(rng.randrange(1, 4 * block_size))]
            r = make_request(f"r{k}", prompt, rng.randrange(1, 4 * block_size), cfg.max_model_len)
            s.add(r)
            live.append(r)
        elif op == "abort" and live:
            s.finish(live.pop(rng.randrange(len(live))), FinishReason.ABORT)
        elif op == "step" and s.has_work:
            run_step(s)
        s.blocks.check_invariants(s.running)
    for _ in range(2000):
        if not s.has_work:
            break
        run_step(s)
    assert not s.has_work
    assert s.blocks.num_free_blocks == num_blocks
    assert all(b.ref_count == 0 for b in s.blocks.blocks)
