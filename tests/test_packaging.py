"""Every import package under server/, engine/, model/, tokenization/ is listed for installation.

(An unlisted subpackage works in a source checkout and breaks in the Docker image.)
"""

from __future__ import annotations

import re
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


def test_ci_builds_a_virtualenv_of_its_own_from_scratch():
    """Not the README's serving `.venv`: CI installs the test extras into a fresh one every run."""
    script = (ROOT / ".ci" / "run").read_text()
    venv = re.search(r"^VENV=(\S+)$", script, flags=re.MULTILINE).group(1)
    assert venv != ".venv" and 'python3 -m venv --clear "$VENV"' in script
    assert ".venv/" not in script  # every tool is called through "$VENV"
    assert f"{venv}/" in (ROOT / ".gitignore").read_text().splitlines()
