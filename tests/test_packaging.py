"""Every import package under server/, engine/, model/, tokenization/ is listed for installation.

(An unlisted subpackage works in a source checkout and breaks in the Docker image.)
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_all_subpackages_are_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("server", "engine", "model", "tokenization")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found == listed
