from __future__ import annotations

import pytest

from tests.checkpoints import TinyShape, hf_mixtral, write_hf_mixtral

SHAPE = TinyShape()


@pytest.fixture(scope="session")
def oracle():
    """transformers' MixtralForCausalLM with random peaky weights (fp32)."""
    return hf_mixtral(SHAPE)


@pytest.fixture(scope="session")
def hf_dir(oracle, tmp_path_factory):
    return write_hf_mixtral(oracle, SHAPE, tmp_path_factory.mktemp("hf-mixtral"))
