"""Compiling and loading the native decode step (`decode.cpp`), or the reason it is unavailable.

The library is built with the system's `g++` into the cache (`$XDG_CACHE_HOME/mixtral-server/
native/`), keyed by a hash of the source and the flags, so a second start loads it at once. It
is loaded after torch, so its OpenMP calls resolve to the runtime torch already loaded and both
share one thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from model.demo import default_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.cpp")
ISA = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma")
FLAGS = ("-O3", *ISA, "-fopenmp", "-fPIC", "-shared")
# CPU features the library's code paths use (names as /proc/cpuinfo spells them).
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "fma")
BF16_CPU_FLAG = "avx512_bf16"


@dataclass(frozen=True, slots=True)
class NativeLibrary:
    dll: ctypes.CDLL
    path: Path
    cpu_flags: frozenset[str]

    @property
    def has_bf16(self) -> bool:
        return BF16_CPU_FLAG in self.cpu_flags


_loaded: NativeLibrary | str | None = None


def load_native() -> NativeLibrary | str:
    """The library, built if need be; or, as a string, why it cannot be had here. Once per process."""
    global _loaded
    if _loaded is None:
        try:
            _loaded = _load()
        except subprocess.CalledProcessError as exc:
            _loaded = f"building {SOURCE.name} failed: {exc.stderr.decode(errors='replace').strip()[-2000:]}"
        except OSError as exc:
            _loaded = f"building or loading {SOURCE.name} failed: {exc}"
    return _loaded


def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _load() -> NativeLibrary | str:
    flags = cpu_flags()
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    compiler = shutil.which("g++")
    if compiler is None:
        return "no C++ compiler (g++) on PATH"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    lib = default_cache_dir() / "native" / key / "libmixtral_decode.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        log.info("building the native CPU decode step (%s) ...", lib)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)], check=True, capture_output=True)
            os.replace(out, lib)  # atomic: a concurrent start sees a whole library or none
        log.info("built the native CPU decode step in %.1f s", time.perf_counter() - start)
    import torch  # noqa: F401  (loaded first: its OpenMP runtime is the one the library binds to)

    return NativeLibrary(ctypes.CDLL(str(lib)), lib, flags)
