"""Shared helpers for engine tests: a tiny fp32 Mixtral behind a real engine and tokenizer."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from engine.config import EngineConfig
from engine.factory import grammar_compiler
from engine.llm_engine import Engine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from model.loader import load_model
from tokenization.loader import load_prompt_encoder

EOS = 2


def make_engine(hf_dir: Path, grammars: bool = False, **overrides) -> Engine:
    """`grammars`: with structured output (llguidance over the checkpoint's tokenizer)."""
    model = load_model(hf_dir, dtype="float32")
    settings = {"max_model_len": 256, "num_kv_blocks": 128, "block_size": 8, "max_num_seqs": 16} | overrides
    encoder = load_prompt_encoder(hf_dir)
    compiler = grammar_compiler(encoder, model) if grammars else None
    return Engine(model, EngineConfig(**settings), encoder, eos_token_id=EOS, grammars=compiler)


def run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]], max_steps: int = 5000):
    """Add every request, step to completion; outputs per (request id, choice index)."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outputs: dict[tuple[str, int], list[RequestOutput]] = defaultdict(list)
    for _ in range(max_steps):
        if not engine.has_work:
            break
        for out in engine.step():
            outputs[(out.request_id, out.index)].append(out)
    assert not engine.has_work
    return outputs


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def text(outs: list[RequestOutput]) -> str:
    return "".join(o.new_text for o in outs)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)
