from __future__ import annotations

import os

import pytest
import torch

from tests.checkpoints import TinyShape, hf_mixtral, write_hf_mixtral

torch.set_num_threads(2)

SHAPE = TinyShape()

# The Triton kernel tests run in their own invocation (see .ci/run): on CPU, Triton's interpreter
# must be switched on before triton is imported, which a shared process cannot promise.
KERNELS_ENABLED = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
collect_ignore = [] if KERNELS_ENABLED else ["kernels"]


def pytest_report_header(config):
    if not KERNELS_ENABLED:
        return "tests/kernels skipped: run them with TRITON_INTERPRET=1 python -m pytest tests/kernels"
    return None


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
