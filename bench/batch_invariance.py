"""Does a greedy request get the same tokens alone as inside a batch? (RELIABILITY.md item 22)

    python -m bench.batch_invariance              # the demo model (SmolLM2-135M), fp32 and bf16
    python -m bench.batch_invariance --model DIR  # any checkpoint the server loads

Sixteen chat requests of mixed lengths (prompts of about 30 to 600 tokens), greedy, 64 new
tokens each (ignore_eos). Each runs alone, then all sixteen are submitted together to the same
engine, under each engine setting below; prefix caching is off, so no request reuses another's
keys and values. Printed per dtype and setting: how many of the 16
token sequences are identical to the request alone, and where the others first differ.

Why they can differ: the batch changes the shapes of the matrix products (rows from other
sequences, prompts split into chunks that share a step), and a GEMM library may sum in a
different order for a different shape. In fp32 the difference is ~1e-6 and rarely flips a
greedy choice; in bf16 activations round to 8 bits of mantissa, so a near-tie between the two
best tokens flips more often, and every later token follows the new prefix.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from engine.config import EngineConfig
from engine.llm_engine import Engine
from engine.sampling_params import SamplingParams
from model.demo import ensure_demo
from model.loader import load_model
from tokenization.loader import load_prompt_encoder
from tokenization.messages import ChatMessage

NEW_TOKENS = 64
TOPICS = [
    "Why is the sky blue?",
    "Write a haiku about autumn.",
    "What is the capital of France?",
    "Explain recursion to a child.",
    "List three uses of copper.",
    "How do vaccines work?",
    "Translate 'good morning' into Spanish.",
    "What causes tides?",
]
PASSAGE = (
    "The river ran through the old town, past the mill and the market square, where traders sold "
    "bread, cloth and tools every morning before the bells of the church rang nine. "
)
# Engine settings: the default (prompts computed whole), and chunked prefill (a 64-token budget
# per step, so prompts are split and share steps with decodes).
SETTINGS = {"default": {}, "chunked prefill (64/step)": {"max_num_batched_tokens": 64}}


def conversations() -> list[list[ChatMessage]]:
    """16 single-turn chats: the 8 short questions, then 8 about a passage of 1 to 15 repeats."""
    short = [[ChatMessage("user", q)] for q in TOPICS]
    long = [
        [ChatMessage("user", PASSAGE * (1 + 2 * i) + "\nSummarise the passage above in one sentence.")]
        for i in range(8)
    ]
    return [m for pair in zip(short, long, strict=True) for m in pair]  # mixed lengths interleaved


def make_engine(model_dir: Path, dtype: str, settings: dict) -> Engine:
    model = load_model(model_dir, dtype=dtype)
    encoder = load_prompt_encoder(model_dir)
    # No queue bound: a slow run must not drop a request it compares.
    fixed = {"max_model_len": 2048, "num_kv_blocks": 1024, "block_size": 16, "max_num_seqs": 16}
    config = EngineConfig(**fixed | {"enable_prefix_caching": False, "max_queue_time_s": 0} | settings)
    return Engine(model, config, encoder, eos_token_id=encoder.eos_id)


def generate(engine: Engine, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    while engine.has_work:
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: the demo model)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    model_dir = args.model or ensure_demo("dense")
    encoder = load_prompt_encoder(model_dir)
    prompts = {f"r{i:02d}": encoder.encode_chat(m) for i, m in enumerate(conversations())}
    lengths = sorted(len(p) for p in prompts.values())
    print(
        f"# batch invariance: {model_dir.name}, {len(prompts)} greedy requests, {NEW_TOKENS} new tokens each"
    )
    print(f"# prompt tokens: {lengths[0]} to {lengths[-1]} (median {lengths[len(lengths) // 2]})")
    print()
    print(
        "| dtype | engine setting | identical to alone | first differing token (of those that differ) | s |"
    )
    print("|---|---|---:|---|---:|")
    for dtype in args.dtypes.split(","):
        for name, settings in SETTINGS.items():
            started = time.monotonic()
            engine = make_engine(model_dir, dtype, settings)
            alone = {rid: generate(engine, {rid: ids})[rid] for rid, ids in prompts.items()}
            together = generate(engine, prompts)
            diffs = {rid: first_difference(alone[rid], together[rid]) for rid in prompts}
            differing = sorted(d for d in diffs.values() if d is not None)
            same = len(prompts) - len(differing)
            where = ", ".join(map(str, differing)) or "-"
            elapsed = time.monotonic() - started
            print(f"| {dtype} | {name} | {same} / {len(prompts)} | {where} | {elapsed:.0f} |", flush=True)


if __name__ == "__main__":
    main()
