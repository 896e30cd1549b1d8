"""The import rules of DESIGN.md: server -> engine -> model; tokenization/ and server/ stay torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_roots(package: str) -> set[str]:
    roots = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots.add(node.module.split(".")[0])
    return roots


def test_model_imports_neither_engine_nor_server():
    assert not imported_roots("model") & {"engine", "server"}


def test_tokenization_imports_no_torch_or_upper_layers():
    assert not imported_roots("tokenization") & {"torch", "transformers", "model", "engine", "server"}


def test_tokenization_import_pulls_in_no_torch():
    code = "import sys, tokenization; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_server_app_and_tokenization_load_no_torch():
    """The HTTP face is torch-free: the engine (and torch) is injected by the CLI."""
    code = "import sys, server.app, tokenization; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
