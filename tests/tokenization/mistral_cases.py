"""API request bodies with two hand-written expectations each, for the v1 (Mixtral 8x7B) encoder.

Each case gives (a) the mistral-common messages the body should become, and (b) the v1 prompt as
turns: ("inst", text) is `[INST] {text} [/INST]`, ("ans", text) an answer ending with `</s>`,
("open", text) a `prefix` answer left open (no `</s>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mistral_common.protocol.instruct.chunk import TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage

from tokenization import SAFE_PROMPT

Turn = tuple[str, str]


@dataclass(frozen=True)
class Case:
    name: str
    body: dict[str, Any]
    mistral_messages: list[Any]
    turns: list[Turn]


def s(content: Any) -> dict[str, Any]:
    return {"role": "system", "content": content}


def u(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def a(content: Any, prefix: bool = False) -> dict[str, Any]:
    return {"role": "assistant", "content": content, **({"prefix": True} if prefix else {})}


def text(*parts: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": part} for part in parts]


def body(*messages: dict[str, Any], safe_prompt: bool = False) -> dict[str, Any]:
    return {"model": "mixtral", "messages": list(messages), "safe_prompt": safe_prompt}


MS, MU, MA = SystemMessage, UserMessage, AssistantMessage
LONG = "The quick brown fox jumps over the lazy dog. " * 60

CASES: list[Case] = [
    Case("single_user", body(u("Hi")), [MU(content="Hi")], [("inst", "Hi")]),
    Case(
        "system_user",
        body(s("Be nice"), u("Hi")),
        [MS(content="Be nice"), MU(content="Hi")],
        [("inst", "Be nice\n\nHi")],
    ),
    Case(
        "system_multi_turn",
        body(s("Be nice"), u("Hi"), a("Hello"), u("Again")),
        [MS(content="Be nice"), MU(content="Hi"), MA(content="Hello"), MU(content="Again")],
        [("inst", "Be nice\n\nHi"), ("ans", "Hello"), ("inst", "Again")],
    ),
    Case(
        "few_shot",
        body(s("Translate to French."), u("cat"), a("chat"), u("dog"), a("chien"), u("bird")),
        [MS(content="Translate to French."), MU(content="cat"), MA(content="chat")]
        + [MU(content="dog"), MA(content="chien"), MU(content="bird")],
        [
            ("inst", "Translate to French.\n\ncat"),
            ("ans", "chat"),
            ("inst", "dog"),
            ("ans", "chien"),
            ("inst", "bird"),
        ],
    ),
    Case(
        "few_shot_no_system",
        body(u("2+2"), a("4"), u("3+3")),
        [MU(content="2+2"), MA(content="4"), MU(content="3+3")],
        [("inst", "2+2"), ("ans", "4"), ("inst", "3+3")],
    ),
    Case(
        "user_chunks",
        body(u(text("Hello", "world"))),
        [MU(content=[TextChunk(text="Hello"), TextChunk(text="world")])],
        [("inst", "Hello\n\nworld")],
    ),
    Case(
        "system_chunks",
        body(s(text("Rule one.", "Rule two.")), u("Go")),
        [MS(content=[TextChunk(text="Rule one."), TextChunk(text="Rule two.")]), MU(content="Go")],
        [("inst", "Rule one.\n\nRule two.\n\nGo")],
    ),
    Case(
        "assistant_chunks",
        body(u("q"), a(text("part one", "part two")), u("more")),
        [
            MU(content="q"),
            MA(content=[TextChunk(text="part one"), TextChunk(text="part two")]),
            MU(content="more"),
        ],
        [("inst", "q"), ("ans", "part one\n\npart two"), ("inst", "more")],
    ),
    Case(
        "empty_chunk_skipped",
        body(u(text("", "x"))),
        [MU(content=[TextChunk(text=""), TextChunk(text="x")])],
        [("inst", "x")],
    ),
    Case(
        "developer",
        body({"role": "developer", "content": "Be brief"}, u("Hi")),
        [MS(content="Be brief"), MU(content="Hi")],
        [("inst", "Be brief\n\nHi")],
    ),
    Case(
        "developer_and_system",
        body(s("A"), {"role": "developer", "content": "B"}, u("Hi")),
        [MS(content="A"), MS(content="B"), MU(content="Hi")],
        [("inst", "A\n\nB\n\nHi")],
    ),
    Case(
        "prefix",
        body(u("Write a haiku"), a("Autumn", prefix=True)),
        [MU(content="Write a haiku"), MA(content="Autumn", prefix=True)],
        [("inst", "Write a haiku"), ("open", "Autumn")],
    ),
    Case(
        "prefix_with_history",
        body(s("Poet"), u("One"), a("Uno"), u("Two"), a("Do", prefix=True)),
        [
            MS(content="Poet"),
            MU(content="One"),
            MA(content="Uno"),
            MU(content="Two"),
            MA(content="Do", prefix=True),
        ],
        [("inst", "Poet\n\nOne"), ("ans", "Uno"), ("inst", "Two"), ("open", "Do")],
    ),
    Case(
        "prefix_trailing_space",
        body(u("Answer"), a("Sure, ", prefix=True)),
        [MU(content="Answer"), MA(content="Sure, ", prefix=True)],
        [("inst", "Answer"), ("open", "Sure, ")],
    ),
    Case(
        "safe_prompt",
        body(u("Hi"), safe_prompt=True),
        [MS(content=SAFE_PROMPT), MU(content="Hi")],
        [("inst", f"{SAFE_PROMPT}\n\nHi")],
    ),
    Case(
        "safe_prompt_with_system",
        body(s("Be nice"), u("Hi"), safe_prompt=True),
        [MS(content=SAFE_PROMPT), MS(content="Be nice"), MU(content="Hi")],
        [("inst", f"{SAFE_PROMPT}\n\nBe nice\n\nHi")],
    ),
    Case("consecutive_users", body(u("a"), u("b")), [MU(content="a"), MU(content="b")], [("inst", "a\n\nb")]),
    Case(
        "consecutive_users_with_system",
        body(s("S"), u("one"), u("two"), u("three")),
        [MS(content="S"), MU(content="one"), MU(content="two"), MU(content="three")],
        [("inst", "S\n\none\n\ntwo\n\nthree")],
    ),
    Case("consecutive_empty_user", body(u(""), u("x")), [MU(content=""), MU(content="x")], [("inst", "x")]),
    Case(
        "consecutive_systems",
        body(s("A"), s("B"), u("q")),
        [MS(content="A"), MS(content="B"), MU(content="q")],
        [("inst", "A\n\nB\n\nq")],
    ),
    Case(
        "system_between_users",
        body(u("a"), s("S"), u("b")),
        [MU(content="a"), MS(content="S"), MU(content="b")],
        [("inst", "S\n\na"), ("inst", "b")],
    ),
    Case(
        "late_system_moves_to_first_turn",
        body(s("S1"), u("u1"), a("a1"), u("u2"), s("S2"), u("u3")),
        [
            MS(content="S1"),
            MU(content="u1"),
            MA(content="a1"),
            MU(content="u2"),
            MS(content="S2"),
            MU(content="u3"),
        ],
        [("inst", "S1\n\nS2\n\nu1"), ("ans", "a1"), ("inst", "u2"), ("inst", "u3")],
    ),
    Case("empty_system_ignored", body(s(""), u("x")), [MS(content=""), MU(content="x")], [("inst", "x")]),
    Case("only_system", body(s("S")), [MS(content="S")], [("inst", "S\n\n")]),
    Case(
        "starts_with_assistant",
        body(a("x"), u("y")),
        [MA(content="x"), MU(content="y")],
        [("inst", ""), ("ans", "x"), ("inst", "y")],
    ),
    Case(
        "consecutive_assistants",
        body(u("u"), a("x"), a("y"), u("z")),
        [MU(content="u"), MA(content="x"), MA(content="y"), MU(content="z")],
        [("inst", "u"), ("ans", "x\n\ny"), ("inst", "z")],
    ),
    Case(
        "consecutive_assistants_prefix",
        body(u("u"), a("x"), a("y", prefix=True)),
        [MU(content="u"), MA(content="x"), MA(content="y", prefix=True)],
        [("inst", "u"), ("open", "x\n\ny")],
    ),
    Case(
        "cyrillic",
        body(u("Привет, как дела?")),
        [MU(content="Привет, как дела?")],
        [("inst", "Привет, как дела?")],
    ),
    Case(
        "emoji",
        body(u("I love 🍕 and 🎉! 👩‍💻")),
        [MU(content="I love 🍕 and 🎉! 👩‍💻")],
        [("inst", "I love 🍕 and 🎉! 👩‍💻")],
    ),
    Case(
        "cjk_multi_turn",
        body(u("你好，世界"), a("こんにちは"), u("안녕하세요")),
        [MU(content="你好，世界"), MA(content="こんにちは"), MU(content="안녕하세요")],
        [("inst", "你好，世界"), ("ans", "こんにちは"), ("inst", "안녕하세요")],
    ),
    Case(
        "rtl_and_combining",
        body(u("مرحبا e\u0301")),
        [MU(content="مرحبا e\u0301")],
        [("inst", "مرحبا e\u0301")],
    ),
    Case("single_space", body(u(" ")), [MU(content=" ")], [("inst", " ")]),
    Case("single_char", body(u("a")), [MU(content="a")], [("inst", "a")]),
    Case("empty_user", body(u("")), [MU(content="")], [("inst", "")]),
    Case(
        "space_answer",
        body(u("q"), a(" "), u("r")),
        [MU(content="q"), MA(content=" "), MU(content="r")],
        [("inst", "q"), ("ans", " "), ("inst", "r")],
    ),
    Case(
        "newlines",
        body(u("line1\nline2\n\n\nline3\n")),
        [MU(content="line1\nline2\n\n\nline3\n")],
        [("inst", "line1\nline2\n\n\nline3\n")],
    ),
    Case(
        "padding_and_tabs",
        body(u("  padded\tcell  ")),
        [MU(content="  padded\tcell  ")],
        [("inst", "  padded\tcell  ")],
    ),
    Case(
        "control_token_lookalikes",
        body(u("[INST] fake [/INST] </s> <s>")),
        [MU(content="[INST] fake [/INST] </s> <s>")],
        [("inst", "[INST] fake [/INST] </s> <s>")],
    ),
    Case(
        "long_text",
        body(u(LONG), a(LONG), u("ok")),
        [MU(content=LONG), MA(content=LONG), MU(content="ok")],
        [("inst", LONG), ("ans", LONG), ("inst", "ok")],
    ),
    Case(
        "code_block",
        body(u("Fix:\n```python\ndef f(x):\n    return x+1\n```")),
        [MU(content="Fix:\n```python\ndef f(x):\n    return x+1\n```")],
        [("inst", "Fix:\n```python\ndef f(x):\n    return x+1\n```")],
    ),
]
