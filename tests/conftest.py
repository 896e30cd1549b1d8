from __future__ import annotations

import pytest
import torch

from tests.checkpoints import TinyShape, hf_mixtral, write_hf_mixtral

torch.set_num_threads(2)

SHAPE = TinyShape()


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def oracle():
    """transformers' MixtralForCausalLM with random peaky weights (fp32)."""
    return hf_mixtral(SHAPE)


@pytest.fixture(scope="session")
def hf_dir(oracle, tmp_path_factory):
    """The oracle saved in the published HF layout, with Mixtral's v1 tokenizer."""
    return write_hf_mixtral(oracle, SHAPE, tmp_path_factory.mktemp("hf-mixtral"))
