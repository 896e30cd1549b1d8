"""Incremental detokenization and stop strings on Mixtral's real v1 tokenizer and the byte-level BPE fixture.

The v1 vocabulary also runs as an HF Llama-style file (Metaspace, byte fallback, Strip decoder).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenization import PromptEncoder
from tokenization.detokenizer import DetokenizedText, IncrementalDetokenizer

REPLACEMENT = "\ufffd"

TEXTS = [
    "Hello, world! This is a test of streaming text, one token at a time.",
    "Héllo wörld: naïve café, Ångström, façade, Straße, Ærø.",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Emoji 🦜🦩 and a family 👩‍👩‍👧 and flags 🇫🇷🇯🇵, then ꙮ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.",
    "  two leading spaces,\ttabs,\nnew\n\nlines and trailing spaces  ",
    "def f(x):\n    return x + 1  # 😀\n",
    "🦜",
    "a",
    " ",
]


def stream(
    detok: IncrementalDetokenizer, ids: Sequence[int], groups: Sequence[int] | None = None
) -> tuple[list[str], str | None]:
    """Feed `ids` in groups (one by one by default); returns the texts released, finish() last."""
    sizes = iter(groups) if groups is not None else None
    texts: list[str] = []
    stop: str | None = None
    i = 0
    while i < len(ids):
        size = next(sizes, 1) if sizes is not None else 1
        out = detok.add(ids[i : i + size])
        i += size
        texts.append(out.text)
        if out.stop_string is not None:
            stop = out.stop_string
            break
    if stop is not None:  # nothing comes after a stop
        assert detok.add(ids[i:]) == DetokenizedText("")
        assert detok.add(ids[:3]) == DetokenizedText("")
        assert detok.finish() == DetokenizedText("")
        return texts, stop
    final = detok.finish()
    assert final.stop_string is None
    texts.append(final.text)
    return texts, None


def random_groups(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(1, 4) for _ in range(n)]


def first_stop_cut(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """Where a stream ends: at the first stop string to appear (read left to right, the one that
    ends first; on a tie the one that starts first), cut right before it."""
    best: tuple[int, int, str] | None = None
    for stop in stops:
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
            best = (start + len(stop), start, stop)
    return (text, None) if best is None else (text[: best[1]], best[2])


@pytest.fixture(params=["v1", "bpe", "hf-metaspace"])
def encoder(request: pytest.FixtureRequest) -> PromptEncoder:
    names = {"v1": "mixtral_encoder", "bpe": "bpe_encoder", "hf-metaspace": "metaspace_encoder"}
    return request.getfixturevalue(names[request.param])


# --- plain streaming: exactly decode(all ids), never a replacement character ---------------------


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_equals_decode(encoder: PromptEncoder, text: str) -> None:
    ids = encoder.encode_text(text, bos=False)
    expected = encoder.decode(ids)
    assert expected == text.lstrip(" ") or expected == text  # SentencePiece may drop the first space
    rng = random.Random(text)
    for groups in (None, random_groups(rng, len(ids)), random_groups(rng, len(ids)), [len(ids)]):
        texts, stop = stream(IncrementalDetokenizer(encoder.decode), ids, groups)
        assert stop is None
        assert "".join(texts) == expected
        assert not any(REPLACEMENT in piece for piece in texts)


def test_bos_and_eos_add_no_text(encoder: PromptEncoder) -> None:
    ids = [*encoder.encode_text("Hi 🦜 there", bos=True), encoder.eos_id]
    texts, _ = stream(IncrementalDetokenizer(encoder.decode), ids)
    assert "".join(texts) == encoder.decode(ids) == "Hi 🦜 there"


def test_split_characters_are_really_exercised(encoder: PromptEncoder) -> None:
    ids = encoder.encode_text("🦜🦩 ꙮ 𝔘", bos=False)
    lone = [i for i in ids if encoder.decode([i]) == REPLACEMENT]
    assert len(lone) >= 4  # these characters are spelled with several byte tokens


def test_v1_emits_each_character_as_soon_as_it_is_complete(mixtral_encoder: PromptEncoder) -> None:
    """No stop strings: after every token the stream holds nothing but an unfinished character."""
    for text in TEXTS:
        ids = mixtral_encoder.encode_text(text, bos=False)
        detok = IncrementalDetokenizer(mixtral_encoder.decode)
        emitted = ""
        for k in range(1, len(ids) + 1):
            emitted += detok.add(ids[k - 1 : k]).text
            assert emitted == mixtral_encoder.decode(ids[:k]).rstrip(REPLACEMENT)
        assert detok.finish().text == ""


def test_bpe_token_holding_a_space_and_half_a_character(bpe_encoder: PromptEncoder) -> None:
    """A byte-level token can carry a complete space and the first bytes of an emoji: held together."""
    ids = bpe_encoder.encode_text("a 🦜b", bos=False)
    texts, _ = stream(IncrementalDetokenizer(bpe_encoder.decode), ids)
    assert "".join(texts) == "a 🦜b"
    assert not any(REPLACEMENT in piece for piece in texts)


def test_incomplete_bytes_at_the_end_come_out_at_finish(encoder: PromptEncoder) -> None:
    ids = encoder.encode_text("ok 🦜", bos=False)
    truncated = ids[:-1]  # the parrot's last byte never arrives
    detok = IncrementalDetokenizer(encoder.decode)
    streamed = "".join(detok.add([i]).text for i in truncated)
    assert REPLACEMENT not in streamed
    assert streamed + detok.finish().text == encoder.decode(truncated)
    assert encoder.decode(truncated).endswith(REPLACEMENT)


def test_long_stream_matches_decode(encoder: PromptEncoder) -> None:
    text = " ".join(TEXTS) * 5
    ids = encoder.encode_text(text, bos=False)
    texts, _ = stream(IncrementalDetokenizer(encoder.decode), ids, random_groups(random.Random(0), len(ids)))
    assert "".join(texts) == encoder.decode(ids)


# --- context: SentencePiece's leading space ----------------------------------------------------


def split_at(encoder: PromptEncoder, context: str, continuation: str) -> tuple[list[int], list[int]]:
    full = encoder.encode_text(context + continuation, bos=True)
    context_ids = encoder.encode_text(context, bos=True)
    assert full[: len(context_ids)] == context_ids
    return context_ids, full[len(context_ids) :]


def test_v1_continuation_keeps_its_leading_space(mixtral_encoder: PromptEncoder) -> None:
    context, continuation = "The capital of France is", " Paris, a city of two million people. 🗼"
    context_ids, ids = split_at(mixtral_encoder, context, continuation)
    assert mixtral_encoder.decode(ids[:1]) == "Paris"  # alone, the first token's space is dropped
    for groups in (None, random_groups(random.Random(1), len(ids))):
        texts, _ = stream(IncrementalDetokenizer(mixtral_encoder.decode, context_ids), ids, groups)
        assert texts[0] == " Paris" if groups is None else texts[0].startswith(" Paris")
        assert "".join(texts) == continuation
        assert "".join(texts) == mixtral_encoder.decode(context_ids + ids)[len(context) :]


def test_v1_without_context_drops_the_first_space_like_decode(mixtral_encoder: PromptEncoder) -> None:
    _, ids = split_at(mixtral_encoder, "The capital of France is", " Paris, a city.")
    texts, _ = stream(IncrementalDetokenizer(mixtral_encoder.decode), ids)
    assert texts[0] == "Paris"
    assert "".join(texts) == mixtral_encoder.decode(ids) == "Paris, a city."


@pytest.mark.parametrize(
    ("context", "continuation"),
    [
        ("Say 🦜", " is a parrot, and 🦩 a flamingo."),  # context ends with byte-fallback tokens
        ("A", " b"),  # a context shorter than the window
        ("One two three four five six seven eight nine ten", " eleven twelve"),  # longer than it
        ("Line one\n", "Line two\n\n🦜"),
        ("Say 🦜🦩", "🦜 and 🦩."),  # the context window would begin inside a character's bytes
        ("Say 🦩🦜🦩", "🦜🦩"),
    ],
)
def test_continuation_after_context(encoder: PromptEncoder, context: str, continuation: str) -> None:
    context_ids, ids = split_at(encoder, context, continuation)
    texts, _ = stream(IncrementalDetokenizer(encoder.decode, context_ids), ids)
    assert "".join(texts) == continuation
    assert not any(REPLACEMENT in piece for piece in texts)


# --- stop strings ------------------------------------------------------------------------------

STOP_TEXT = "The answer is 42. Next question: what is six times seven? 🦜 Bye."


def pieces_covering(encoder: PromptEncoder, ids: Sequence[int], stop: str, text: str) -> int:
    """How many tokens the first occurrence of `stop` in `text` is spread over."""
    start, end = text.index(stop), text.index(stop) + len(stop)
    decoded = [encoder.decode(list(ids[:k])) for k in range(len(ids) + 1)]
    first = next(k for k in range(len(ids) + 1) if len(decoded[k]) > start)
    last = next(k for k in range(len(ids) + 1) if len(decoded[k]) >= end)
    return last - first + 1


@pytest.mark.parametrize("stop", ["question:", "six times", "? 🦜 B", "42. Next"])
def test_stop_string_across_tokens(encoder: PromptEncoder, stop: str) -> None:
    ids = encoder.encode_text(STOP_TEXT, bos=False)
    assert pieces_covering(encoder, ids, stop, STOP_TEXT) >= 2
    before = STOP_TEXT[: STOP_TEXT.index(stop)]
    for groups in (None, random_groups(random.Random(stop), len(ids))):
        texts, found = stream(IncrementalDetokenizer(encoder.decode, stop=[stop]), ids, groups)
        assert found == stop
        assert "".join(texts) == before  # all the text before the stop string, and nothing more
        assert stop not in "".join(texts)


def test_stop_string_spanning_three_tokens(mixtral_encoder: PromptEncoder) -> None:
    stop = "answer is 42"
    ids = mixtral_encoder.encode_text(STOP_TEXT, bos=False)
    assert pieces_covering(mixtral_encoder, ids, stop, STOP_TEXT) >= 3
    texts, found = stream(IncrementalDetokenizer(mixtral_encoder.decode, stop=[stop]), ids)
    assert (found, "".join(texts)) == (stop, "The ")


def test_stop_string_made_of_byte_fallback_tokens(mixtral_encoder: PromptEncoder) -> None:
    ids = mixtral_encoder.encode_text(STOP_TEXT, bos=False)
    texts, found = stream(IncrementalDetokenizer(mixtral_encoder.decode, stop=["🦜"]), ids)
    assert (found, "".join(texts)) == ("🦜", STOP_TEXT[: STOP_TEXT.index("🦜")])


def test_several_stop_strings_the_earliest_wins(encoder: PromptEncoder) -> None:
    ids = encoder.encode_text(STOP_TEXT, bos=False)
    for stops in (["question", "answer"], ["answer", "question"], ["Bye", "seven", "is six"]):
        texts, found = stream(IncrementalDetokenizer(encoder.decode, stop=stops), ids)
        assert ("".join(texts), found) == first_stop_cut(STOP_TEXT, stops)
    texts, found = stream(IncrementalDetokenizer(encoder.decode, stop=["seven", "is six"]), ids)
    assert ("".join(texts), found) == ("The answer is 42. Next question: what ", "is six")


def test_stop_string_at_the_very_start(encoder: PromptEncoder) -> None:
    ids = encoder.encode_text(STOP_TEXT, bos=False)
    texts, found = stream(IncrementalDetokenizer(encoder.decode, stop=["The ans"]), ids)
    assert (found, "".join(texts)) == ("The ans", "")


def test_stop_string_right_after_the_context(mixtral_encoder: PromptEncoder) -> None:
    context_ids, ids = split_at(mixtral_encoder, "The capital of France is", " Paris.")
    texts, found = stream(IncrementalDetokenizer(mixtral_encoder.decode, context_ids, stop=[" Par"]), ids)
    assert (found, "".join(texts)) == (" Par", "")


def test_partial_match_is_released_at_finish(encoder: PromptEncoder) -> None:
    text = "Hello wor"
    ids = encoder.encode_text(text, bos=False)
    detok = IncrementalDetokenizer(encoder.decode, stop=["world", "Hello world!"])
    streamed = "".join(detok.add([i]).text for i in ids)
    assert streamed != text  # the end could still have become "world"
    final = detok.finish()
    assert final.stop_string is None
    assert streamed + final.text == text


def test_text_that_cannot_begin_a_stop_string_is_not_held(encoder: PromptEncoder) -> None:
    """Holding back is for a possible match only: a long stop string does not delay the rest."""
    stop = "<<END OF THE ANSWER, A LONG STOP STRING>>"
    for text in TEXTS:
        ids = encoder.encode_text(text, bos=False)
        final = encoder.decode(ids)
        detok = IncrementalDetokenizer(encoder.decode, stop=[stop])
        emitted = complete = ""
        for k in range(1, len(ids) + 1):
            emitted += detok.add(ids[k - 1 : k]).text
            decoded = encoder.decode(ids[:k])
            if REPLACEMENT not in decoded:  # every character so far is complete: all of it is out
                complete = decoded
                assert emitted == complete
            else:  # an unfinished character (HF's ByteFallback spoils its whole run of byte tokens)
                assert final.startswith(emitted) and emitted.startswith(complete)


def test_only_a_possible_start_of_a_stop_string_is_held(encoder: PromptEncoder) -> None:
    ids = encoder.encode_text("Hello world, and more", bos=False)
    detok = IncrementalDetokenizer(encoder.decode, stop=["world!"])
    emitted, k = "", 0
    while not encoder.decode(ids[:k]).endswith("world"):
        k += 1
        emitted += detok.add(ids[k - 1 : k]).text
    assert emitted == "Hello "  # "world" is held: it may become "world!"
    rest = "".join(detok.add([i]).text for i in ids[k:]) + detok.finish().text
    assert emitted + rest == "Hello world, and more"


# --- chunking never changes the outcome (a character-level decode makes the tokens explicit) -----


def chars(ids: list[int]) -> str:
    return "".join(map(chr, ids))


def run_chars(text: str, stops: Sequence[str], groups: Sequence[int] | None) -> tuple[str, str | None]:
    texts, found = stream(IncrementalDetokenizer(chars, stop=stops), [ord(c) for c in text], groups)
    return "".join(texts), found


@pytest.mark.parametrize(
    ("text", "stops"),
    [
        ("xabcd", ["abc", "b"]),  # "b" appears inside "abc", before "abc" is complete
        ("xabcd", ["b", "abc"]),
        ("xabcd", ["bc", "abc"]),  # both complete at the same character: the longer one started first
        ("aaab", ["aab", "ab"]),
        ("hello", ["lo", "ell"]),
    ],
)
def test_nested_stop_strings_do_not_depend_on_chunking(text: str, stops: list[str]) -> None:
    expected = first_stop_cut(text, stops)
    for groups in (None, [len(text)], [2, 3], [3, 2], [1, 4]):
        assert run_chars(text, stops, groups) == expected


# --- the property: the output is the text cut before its first stop string -----------------------

ALPHABET = st.one_of(
    st.sampled_from(list("ab c.\n")),
    st.sampled_from(list("éß日本語😀🦜")),
    st.characters(exclude_categories=("Cs",), exclude_characters=REPLACEMENT),
)


@st.composite
def text_and_stops(draw: Callable) -> tuple[str, list[str], list[int]]:
    text = draw(st.text(ALPHABET, min_size=1, max_size=40))
    stops = []
    for _ in range(draw(st.integers(1, 3))):
        start = draw(st.integers(0, len(text) - 1))
        end = draw(st.integers(start + 1, min(len(text), start + 8)))
        stops.append(text[start:end])
    if draw(st.booleans()):
        stops.append(draw(st.text(ALPHABET, min_size=1, max_size=6)))  # usually absent from the text
    groups = draw(st.lists(st.integers(1, 4), max_size=60))
    return text, stops, groups


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=text_and_stops())
def test_output_is_text_cut_before_first_stop(bpe_encoder: PromptEncoder, case: tuple) -> None:
    text, stops, groups = case
    ids = bpe_encoder.encode_text(text, bos=False)
    assert bpe_encoder.decode(ids) == text  # byte-level BPE is lossless
    texts, found = stream(IncrementalDetokenizer(bpe_encoder.decode, stop=stops), ids, groups)
    assert ("".join(texts), found) == first_stop_cut(text, stops)
    assert not any(REPLACEMENT in piece for piece in texts)
