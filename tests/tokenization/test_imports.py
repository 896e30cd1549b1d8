"""tokenization/ stays torch-free: importing any of its modules loads neither torch nor transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import tokenization

PACKAGE_DIR = Path(tokenization.__file__).parent
MODULES = sorted(f"tokenization.{path.stem}" for path in PACKAGE_DIR.glob("*.py") if path.stem != "__init__")


def test_modules_found() -> None:
    assert {"tokenization.messages", "tokenization.loader", "tokenization.hf_encoder"} <= set(MODULES)


@pytest.mark.parametrize("module", ["tokenization", *MODULES])
def test_no_torch_or_transformers(module: str) -> None:
    check = (
        f"import sys, {module}; "
        "heavy = sorted({'torch', 'transformers'} & set(sys.modules)); "
        "assert not heavy, heavy"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=PACKAGE_DIR.parent, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
