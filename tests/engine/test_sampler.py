"""The sampler: processing formulas, greedy and filtered sampling, seeds, frequencies and logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sampler import (
    Sampler,
    SamplingRow,
    make_generator,
    process_logits,
    prompt_logprobs,
    sampling_probs,
)
from engine.sampling_params import SamplingParams

EOS = 2
GREEDY = SamplingParams(temperature=0.0)


def row(
    params: SamplingParams = GREEDY,
    prompt: tuple[int, ...] = (1,),
    output: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    eos: int | None = EOS,
) -> SamplingRow:
    return SamplingRow(params, prompt, output, generator, eos)


def seeded(params: SamplingParams, seed: int, output: tuple[int, ...] = ()) -> SamplingRow:
    return row(params, output=output, generator=make_generator(seed))


# --- greedy and processing -------------------------------------------------------------------


def test_greedy_is_argmax_and_does_not_copy_the_logits():
    logits = torch.randn(8, 50)
    rows = [row() for _ in range(8)]
    out = Sampler(50)(logits, rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8
    assert process_logits(logits, rows) is logits  # the hot path does no processing at all


def test_greedy_ties_pick_the_lowest_id():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    assert Sampler(4)(logits, [row(), row()]).token_ids == [1, 0]


def test_logit_bias_forces_and_bans_tokens():
    logits = torch.randn(2, 30)
    top = logits.argmax(dim=-1).tolist()
    force = SamplingParams(temperature=1.0, logit_bias={7: 100.0})
    ban = SamplingParams(temperature=0.0, logit_bias={top[1]: -100.0})
    sampler = Sampler(30, make_generator(0))
    for _ in range(5):
        out = sampler(logits, [row(force), row(ban)])
        assert out.token_ids[0] == 7
        assert out.token_ids[1] != top[1]
        assert out.token_ids[1] == logits[1].topk(2).indices[1].item()


def test_logit_bias_is_added_exactly_and_the_input_is_left_alone():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    before = logits.clone()
    params = SamplingParams(temperature=0.0, logit_bias={0: 0.5, 3: -4.0, 99: 1.0})  # 99: outside the vocab
    processed = process_logits(logits, [row(params)])
    assert torch.equal(processed, torch.tensor([[1.5, 2.0, 3.0, 0.0]]))
    assert torch.equal(logits, before)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_ids_until_reached(ignore_eos):
    # eos (2) is the most likely token, then stop id 5, then 9.
    logits = torch.zeros(1, 12)
    logits[0, EOS], logits[0, 5], logits[0, 9] = 3.0, 2.0, 1.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(5,), ignore_eos=ignore_eos)
    sampler = Sampler(12)
    for done in range(3):
        short = row(params, output=(4,) * done)
        assert sampler(logits, [short]).token_ids == [9]
        masked = process_logits(logits, [short])[0]
        assert masked[EOS] == masked[5] == -math.inf
        assert masked[9] == 1.0
    assert sampler(logits, [row(params, output=(4, 4, 4))]).token_ids == [EOS]


def test_min_tokens_masking_is_per_row():
    logits = torch.zeros(2, 6)
    logits[:, EOS] = 1.0
    params = SamplingParams(temperature=0.0, min_tokens=1)
    rows = [row(params), row(params, output=(3,))]
    assert Sampler(6)(logits, rows).token_ids == [0, EOS]


def test_penalties_follow_the_formulas_exactly():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = SamplingParams(
        temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25
    )
    r = row(params, prompt=(0, 1), output=(2, 2, 3))
    # repetition over prompt+output {0, 1, 2, 3}: positive / 2, negative * 2;
    # then output counts {2: 2, 3: 1}: minus 0.25 * count, minus 0.5 once per distinct token.
    expected = torch.tensor([[2.0 / 2, -1.0 * 2, 0.5 / 2 - 0.5 - 0.5, 3.0 / 2 - 0.25 - 0.5, -2.0, 1.0]])
    assert torch.equal(process_logits(logits, [r]), expected)


def test_presence_and_frequency_ignore_the_prompt():
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    params = SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=1.0)
    processed = process_logits(logits, [row(params, prompt=(0, 0, 1), output=(2,))])
    assert torch.equal(processed, torch.tensor([[1.0, 1.0, -1.0]]))


def test_a_penalty_flips_the_greedy_pick():
    logits = torch.tensor([[2.0, 1.5, 0.0, 0.0]])
    sampler = Sampler(4)
    assert sampler(logits, [row(output=(0,))]).token_ids == [0]
    for params in (
        SamplingParams(temperature=0.0, frequency_penalty=0.6),
        SamplingParams(temperature=0.0, presence_penalty=0.6),
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
    ):
        assert sampler(logits, [row(params, prompt=(3,), output=(0,))]).token_ids == [1], params
    # a negative frequency penalty rewards repetition instead
    reward = SamplingParams(temperature=0.0, frequency_penalty=-1.0)
    assert sampler(logits, [row(reward, output=(1,))]).token_ids == [1]


def test_batched_penalties_equal_one_row_at_a_time_and_padding_counts_nothing():
    vocab = 10
    logits = torch.randn(3, vocab)
    params = SamplingParams(
        temperature=0.0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2
    )
    rows = [
        row(params, prompt=(3,), output=(4,)),  # shorter than the others: padded in the batch
        row(params, prompt=(0, 1, 2, 5, 5, 5, 7), output=(8, 8, 8, 8)),
        row(GREEDY, prompt=(1, 2, 3), output=(4, 5, 6)),  # no penalty: untouched
    ]
    batched = process_logits(logits, rows)
    for i, r in enumerate(rows):
        assert torch.equal(batched[i : i + 1], process_logits(logits[i : i + 1], [r]))
    assert batched[0, 0] == logits[0, 0] and batched[0, vocab - 1] == logits[0, vocab - 1]
    assert torch.equal(batched[2], logits[2])


# --- filters ---------------------------------------------------------------------------------


def test_top_k_1_and_tiny_top_p_equal_greedy_at_temperature_1():
    logits = torch.randn(16, 100)
    sampler = Sampler(100, make_generator(3))
    greedy = logits.argmax(dim=-1).tolist()
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6)):
        for _ in range(3):
            assert sampler(logits, [row(params) for _ in range(16)]).token_ids == greedy


def test_sampling_probs_apply_min_p_top_k_and_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()

    def kept(**kw: float) -> list[bool]:
        return (sampling_probs(logits, [SamplingParams(**kw)])[0] > 0).tolist()

    assert kept() == [True] * 4
    assert kept(min_p=0.2) == [True, True, True, False]  # 0.05 < 0.2 * 0.5
    assert kept(min_p=0.35) == [True, True, False, False]  # 0.15 < 0.175
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_k=1000) == [True] * 4
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert kept(top_p=0.85) == [True, True, True, False]
    assert kept(top_k=3, top_p=0.5) == [True, False, False, False]
    # the smallest set reaching top_p exactly: two of four equally likely tokens for top_p = 0.5
    flat = sampling_probs(torch.zeros(1, 4), [SamplingParams(top_p=0.5)])[0]
    assert int((flat > 0).sum()) == 2
    filtered = sampling_probs(logits, [SamplingParams(top_k=2)])[0]
    torch.testing.assert_close(filtered, torch.tensor([0.625, 0.375, 0.0, 0.0]))


def test_filters_are_per_row_in_a_batch():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(3, 4)
    params = [SamplingParams(top_k=1), SamplingParams(), SamplingParams(min_p=0.2)]
    probs = sampling_probs(logits, params)
    assert (probs > 0).tolist() == [[True, False, False, False], [True] * 4, [True, True, True, False]]


def test_min_p_filtered_token_is_never_sampled():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(2000, 4).contiguous()
    params = SamplingParams(min_p=0.2)
    tokens = Sampler(4, make_generator(1))(logits, [row(params)] * 2000).token_ids
    assert 3 not in tokens and {0, 1, 2} <= set(tokens)


# --- randomness ------------------------------------------------------------------------------


def draw(sampler: Sampler, rows: list[SamplingRow], vocab: int) -> list[int]:
    return sampler(torch.zeros(len(rows), vocab), rows).token_ids


def test_same_seed_gives_the_same_tokens_across_calls():
    params = SamplingParams(temperature=1.0, seed=42)

    def run() -> list[int]:
        r = seeded(params, 42)
        sampler = Sampler(1000)
        return [draw(sampler, [r], 1000)[0] for _ in range(20)]

    first = run()
    assert first == run()
    assert len(set(first)) > 10  # it does move from step to step


def test_seeded_row_is_independent_of_its_batch_and_order():
    vocab = 500
    params = SamplingParams(temperature=1.0, top_p=0.9)
    logits = torch.randn(1, vocab)

    def steps(make_batch) -> list[int]:
        target = seeded(params, 7)
        other = seeded(params, 8)
        sampler = Sampler(vocab, make_generator(99))
        tokens = []
        for _ in range(10):
            batch = make_batch(target, other)
            out = sampler(logits.expand(len(batch), vocab), batch).token_ids
            tokens.append(out[batch.index(target)])
        return tokens

    alone = steps(lambda t, o: [t])
    assert alone == steps(lambda t, o: [o, row(SamplingParams(temperature=0.5)), t])
    assert alone == steps(lambda t, o: [row(), t, row(SamplingParams(top_k=3)), o])


def test_different_seeds_differ():
    params = SamplingParams(temperature=1.0)
    a, b = seeded(params, 1), seeded(params, 2)
    sampler = Sampler(1000)
    draws = [draw(sampler, [a, b], 1000) for _ in range(20)]
    assert [x for x, _ in draws] != [y for _, y in draws]


def test_unseeded_rows_differ_between_samplers_without_a_batch_generator():
    unseeded = [row(SamplingParams(temperature=1.0))]
    first, second = Sampler(1000), Sampler(1000)
    assert [draw(first, unseeded, 1000) for _ in range(20)] != [
        draw(second, unseeded, 1000) for _ in range(20)
    ]


def test_generators_draw_exactly_one_vector_and_greedy_rows_draw_none():
    vocab = 64
    sampled, greedy = make_generator(5), make_generator(6)
    greedy_state = greedy.get_state()
    rows = [row(SamplingParams(temperature=0.8), generator=sampled), row(GREEDY, generator=greedy)]
    Sampler(vocab)(torch.randn(2, vocab), rows)
    reference = make_generator(5)
    torch.empty(vocab).exponential_(generator=reference)
    assert torch.equal(sampled.get_state(), reference.get_state())
    assert torch.equal(greedy.get_state(), greedy_state)


def test_make_generator_accepts_the_whole_seed_range_deterministically():
    for seed in (-(1 << 63), -1, 0, 1, (1 << 63), (1 << 64) - 1):
        x = torch.rand(4, generator=make_generator(seed))
        assert torch.equal(x, torch.rand(4, generator=make_generator(seed)))
    assert not torch.equal(
        torch.rand(4, generator=make_generator(1)), torch.rand(4, generator=make_generator(2))
    )


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_frequencies_match_softmax(temperature):
    draws = 4000
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log() + 1.0  # [V]
    expected = torch.softmax(logits / temperature, dim=-1) * draws  # [V]
    params = SamplingParams(temperature=temperature)
    tokens = Sampler(4, make_generator(123))(logits.expand(draws, 4), [row(params)] * draws).token_ids
    observed = torch.bincount(torch.tensor(tokens), minlength=4).float()
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    # 3 degrees of freedom: P(chi2 > 16.27) = 0.001. Sampling at the wrong temperature gives
    # chi2 in the hundreds here (e.g. probs 0.1..0.4 against their squares' 0.03..0.53).
    assert chi2 < 16.27, (observed, expected)


# --- logprobs --------------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_logits():
    vocab = 20
    logits = torch.randn(4, vocab)
    raw = torch.log_softmax(logits, dim=-1)
    forced = int(logits[1].argmin())
    rows = [
        row(SamplingParams(temperature=0.7, logprobs=5), generator=make_generator(0)),
        row(SamplingParams(temperature=0.0, logprobs=3, logit_bias={forced: 100.0})),
        row(SamplingParams(temperature=0.0, logprobs=0)),
        row(SamplingParams(temperature=1.0)),
    ]
    out = Sampler(vocab, make_generator(1))(logits, rows)
    assert out.token_ids[1] == forced
    assert out.logprobs[3] is None
    for i, k in ((0, 5), (1, 3), (2, 0)):
        lp = out.logprobs[i]
        assert lp is not None and lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(raw[i, lp.token_id].item(), abs=1e-6)
        assert lp.rank == 1 + int((raw[i] > raw[i, lp.token_id]).sum())
        values, ids = raw[i].topk(k)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-6)
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:], strict=False))
    assert out.logprobs[1].rank == vocab  # the forced token is the least likely under the model
    assert out.logprobs[2].rank == 1 and out.logprobs[2].top == ()


def test_prompt_logprobs_match_a_direct_computation():
    logits = torch.randn(6, 30)
    targets = [3, 0, 29, 7, 7, 12]
    raw = torch.log_softmax(logits, dim=-1)
    result = prompt_logprobs(logits, targets, 4)
    assert [r.token_id for r in result] == targets
    for i, (r, t) in enumerate(zip(result, targets, strict=True)):
        assert r.logprob == pytest.approx(raw[i, t].item(), abs=1e-6)
        assert r.rank == 1 + int((raw[i] > raw[i, t]).sum())
        assert [tid for tid, _ in r.top] == raw[i].topk(4).indices.tolist()
    assert all(r.top == () for r in prompt_logprobs(logits, targets, 0))
    assert prompt_logprobs(logits[:0], [], 2) == []
    with pytest.raises(ValueError):
        prompt_logprobs(logits, targets[:-1], 1)


def test_shape_mismatch_is_rejected():
    sampler = Sampler(10)
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, 10), [row()])
    with pytest.raises(ValueError):
        sampler(torch.zeros(1, 11), [row()])


# --- consistency -----------------------------------------------------------------------------

_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 1.0, 1.7]),
    top_k=st.sampled_from([0, 1, 5]),
    top_p=st.sampled_from([1.0, 0.9, 0.3]),
    min_p=st.sampled_from([0.0, 0.1]),
    presence_penalty=st.sampled_from([0.0, 0.5]),
    frequency_penalty=st.sampled_from([0.0, -0.3]),
    repetition_penalty=st.sampled_from([1.0, 1.2]),
    logit_bias=st.sampled_from([{}, {3: 5.0}]),
    min_tokens=st.sampled_from([0, 2]),
    stop_token_ids=st.sampled_from([(), (4,)]),
)


@settings(max_examples=30, deadline=None)
@given(
    specs=st.lists(
        st.tuples(_params, st.integers(0, 2**32), st.lists(st.integers(0, 39), max_size=4)),
        min_size=1,
        max_size=5,
    ),
    data=st.randoms(use_true_random=False),
)
def test_batched_seeded_sampling_equals_one_row_at_a_time(specs, data):
    vocab = 40
    logits = torch.randn(len(specs), vocab, generator=make_generator(len(specs)))
    rows = [SamplingRow(p, (1, 2), tuple(out), make_generator(seed), EOS) for p, seed, out in specs]
    alone = [
        Sampler(vocab)(logits[i : i + 1], [SamplingRow(p, (1, 2), tuple(out), make_generator(seed), EOS)])
        for i, (p, seed, out) in enumerate(specs)
    ]
    order = list(range(len(specs)))
    data.shuffle(order)
    batched = Sampler(vocab)(logits[order], [rows[i] for i in order]).token_ids
    assert [batched[order.index(i)] for i in range(len(specs))] == [a.token_ids[0] for a in alone]
