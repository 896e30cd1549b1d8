"""Every supported checkpoint layout loads to the same model; bad checkpoints fail clearly."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.config import UnsupportedConfigError, load_config
from model.loader import CheckpointError, load_model
from tests.checkpoints import (
    TinyShape,
    consolidated_params,
    consolidated_state,
    hf_dense,
    write_consolidated,
    write_hf_fused,
)
from tests.conftest import SHAPE
from tests.model.paged import PagedHarness
from tests.model.test_against_transformers import PROMPTS, oracle_logits


def prefill(model, prompts=PROMPTS):
    return PagedHarness(model, block_size=6).prefill(prompts)


def assert_same_logits(a, b, atol=1e-4):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def hf_logits(hf_dir):
    return prefill(load_model(hf_dir, dtype="float32"))


def test_transformers5_fused_layout(oracle, hf_logits, tmp_path):
    path = write_hf_fused(oracle, tmp_path / "fused")
    raw = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in raw and "dtype" in raw  # the newer config keys
    assert load_config(path).rope_theta == SHAPE.rope_theta
    assert_same_logits(prefill(load_model(path, dtype="float32")), hf_logits)


@pytest.mark.parametrize("stacked", [False, True], ids=["consolidated.safetensors", "consolidated.00.pth"])
def test_consolidated_layouts(oracle, hf_logits, tmp_path, stacked):
    path = write_consolidated(oracle, SHAPE, tmp_path / "cons", stacked=stacked)
    assert_same_logits(prefill(load_model(path, dtype="float32")), hf_logits)


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_complex(x, cis):
    """Interleaved-pair rotary as mistral-inference writes it: (x0 + i x1) * e^{i theta}."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))  # [L, H, Dh/2]
    return torch.view_as_real(xc * cis[:, None, :]).flatten(2)


def reference_forward(sd: dict, params: dict, tokens: list[int]) -> torch.Tensor:
    """An independent forward of a consolidated checkpoint (interleaved rotary, expert loop)."""
    n, h, kvh, dh = len(tokens), params["n_heads"], params["n_kv_heads"], params["head_dim"]
    freqs = 1.0 / params["rope_theta"] ** (torch.arange(0, dh, 2).double() / dh)
    cis = torch.polar(torch.ones(n, dh // 2).double(), torch.outer(torch.arange(n).double(), freqs)).cfloat()
    causal = torch.full((n, n), float("-inf")).triu(1)
    x = sd["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        p = f"layers.{i}"
        y = _rms(x, sd[f"{p}.attention_norm.weight"])
        q = _rotate_complex((y @ sd[f"{p}.attention.wq.weight"].T).view(n, h, dh), cis)
        k = _rotate_complex((y @ sd[f"{p}.attention.wk.weight"].T).view(n, kvh, dh), cis)
        v = (y @ sd[f"{p}.attention.wv.weight"].T).view(n, kvh, dh)
        k, v = k.repeat_interleave(h // kvh, dim=1), v.repeat_interleave(h // kvh, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(dh) + causal
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(n, h * dh)
        x = x + o @ sd[f"{p}.attention.wo.weight"].T
        y = _rms(x, sd[f"{p}.ffn_norm.weight"])
        top_logits, chosen = torch.topk(
            y @ sd[f"{p}.feed_forward.gate.weight"].T, params["moe"]["num_experts_per_tok"]
        )
        weights = top_logits.softmax(-1)  # softmax over the chosen logits: mistral-inference's form
        out = torch.zeros_like(x)
        for e in range(params["moe"]["num_experts"]):
            tok, slot = torch.where(chosen == e)
            ex = f"{p}.feed_forward.experts.{e}"
            hid = F.silu(y[tok] @ sd[f"{ex}.w1.weight"].T) * (y[tok] @ sd[f"{ex}.w3.weight"].T)
            out[tok] += weights[tok, slot, None] * (hid @ sd[f"{ex}.w2.weight"].T)
        x = x + out
    return _rms(x, sd["norm.weight"]) @ sd["output.weight"].T


def test_rotary_convention_against_complex_reference(oracle, tmp_path):
    path = write_consolidated(oracle, SHAPE, tmp_path / "cons", stacked=False)
    sd = load_file(str(path / "consolidated.safetensors"))
    ours = prefill(load_model(path, dtype="float32"))
    for prompt, got in zip(PROMPTS, ours, strict=True):
        torch.testing.assert_close(
            got, reference_forward(sd, consolidated_params(SHAPE), prompt), atol=1e-4, rtol=0
        )


@pytest.mark.parametrize(
    ("kind", "shape", "tie"),
    [
        ("llama", TinyShape(num_layers=2, num_kv_heads=1), True),  # tied embeddings, GQA 4:1
        ("mistral", TinyShape(num_layers=2, head_dim=32), False),  # head_dim != hidden / heads
        ("mistral", TinyShape(num_layers=1, num_kv_heads=4), False),  # plain multi-head
    ],
)
def test_dense_checkpoints_match_transformers(tmp_path, kind, shape, tie):
    oracle = hf_dense(kind, shape, tie=tie)
    oracle.save_pretrained(tmp_path)
    if tie:
        assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    model = load_model(tmp_path, dtype="float32")
    assert model.config.moe is None and model.config.tie_word_embeddings is tie
    for prompt, got in zip(PROMPTS, prefill(model), strict=True):
        torch.testing.assert_close(got, oracle_logits(oracle, prompt), atol=1e-4, rtol=0)


# Relative RMS error of the logits against fp32. Measured: bf16 <= 0.036, fp16 <= 0.003, both on par
# with transformers' own bf16/fp16 error on this fixture (0.075 / 0.027 at worst).
@pytest.mark.parametrize(("dtype", "bound"), [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_load_dtype_is_chosen_at_load_time(hf_dir, hf_logits, dtype, bound):
    model = load_model(hf_dir, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    for x, ref in zip(prefill(model), hf_logits, strict=True):
        assert torch.isfinite(x).all()
        assert (x - ref).norm() / ref.norm() < bound


def test_default_dtype_is_the_checkpoints(hf_dir):
    assert load_model(hf_dir).embed_tokens.weight.dtype == torch.bfloat16  # torch_dtype in config.json


def test_missing_and_unexpected_tensors_are_named(oracle, tmp_path):
    state = consolidated_state(oracle, SHAPE, stacked=False)
    del state["layers.1.feed_forward.experts.3.w2.weight"]
    state["layers.0.attention.wq.bias"] = torch.zeros(4)
    save_file(state, str(tmp_path / "consolidated.safetensors"))
    (tmp_path / "params.json").write_text(json.dumps(consolidated_params(SHAPE)))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    msg = str(err.value)
    assert "1 missing tensor(s): layers.1.feed_forward.experts.3.w2.weight" in msg
    assert "1 unexpected tensor(s): layers.0.attention.wq.bias" in msg


def test_wrong_shape_is_named(oracle, tmp_path):
    state = consolidated_state(oracle, SHAPE, stacked=False)
    state["norm.weight"] = torch.ones(SHAPE.hidden_size + 1)
    save_file(state, str(tmp_path / "consolidated.safetensors"))
    (tmp_path / "params.json").write_text(json.dumps(consolidated_params(SHAPE)))
    with pytest.raises(CheckpointError, match=r"'norm.weight' has shape \(65,\), expected \(64,\)"):
        load_model(tmp_path)


def test_missing_shard_is_named(hf_dir, tmp_path):
    copy = shutil.copytree(hf_dir, tmp_path / "copy")
    victim = sorted(copy.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(copy)


def _config_with(hf_dir, tmp_path, **changes):
    raw = json.loads((hf_dir / "config.json").read_text()) | changes
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sliding_window": 128}, "sliding_window=128 is smaller than the context length 512"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "rope_type='yarn'"),
        ({"model_type": "qwen2"}, "model_type='qwen2' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ],
)
def test_unimplemented_config_features_are_refused(hf_dir, tmp_path, changes, message):
    with pytest.raises(UnsupportedConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(_config_with(hf_dir, tmp_path, **changes))


def test_sliding_window_accepted_when_context_fits_it(hf_dir, tmp_path):
    cfg = load_config(_config_with(hf_dir, tmp_path, sliding_window=128), max_model_len=128)
    assert cfg.max_position_embeddings == 512


def test_sliding_window_in_params_json_is_refused(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(consolidated_params(SHAPE) | {"sliding_window": 64}))
    with pytest.raises(UnsupportedConfigError, match="params.json: sliding_window=64"):
        load_config(tmp_path)
