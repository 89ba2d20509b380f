"""Builds and loads the CPU paged decode kernel (csrc/paged_decode.cpp) once per process.

The kernel is compiled on first use with torch's C++ extension builder into torch's
extension cache (``TORCH_EXTENSIONS_DIR``, default ~/.cache/torch_extensions); later
processes load the cached library, rebuilt only when the source changes. Concurrent
first uses wait on the builder's lock. It needs a CPU with AVX-512 (torch reports the
capability) and a C++ compiler; ``unavailable_reason()`` says why not, where not.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
NAME = "adrenaline_paged_decode"
FLAGS = ["-O3", "-mavx512f", "-mfma"]  # no -march=native: the library may move between hosts

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


def unavailable_reason() -> str | None:
    """None where the kernel can run here; otherwise why it cannot."""
    if _module is None and _error is None:
        _load()
    return _error


def paged_decode_module() -> ModuleType:
    """The compiled kernel module; RuntimeError with the reason where it cannot be had."""
    if unavailable_reason() is not None:
        raise RuntimeError(f"CPU paged decode kernel unavailable: {_error}")
    return _module


def _load() -> None:
    global _module, _error
    with _lock:
        if _module is not None or _error is not None:
            return
        if torch.backends.cpu.get_cpu_capability() != "AVX512":
            _error = f"needs AVX-512; this CPU has {torch.backends.cpu.get_cpu_capability()}"
            return
        try:  # the ninja the project depends on, also where the venv's bin is not on PATH
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            _error = f"no C++ compiler ({cxx!r} not on PATH)"
            return
        try:
            from torch.utils.cpp_extension import load
            _module = load(NAME, [str(SOURCE)], extra_cflags=FLAGS, verbose=False)
        except Exception as e:  # a failed build: report it, the caller picks another backend
            _error = f"build failed: {type(e).__name__}: {str(e)[-500:]}"
            log.warning("CPU paged decode kernel: %s", _error)


if __name__ == "__main__":  # `make setup` builds it ahead of first use
    reason = unavailable_reason()
    print("CPU paged decode kernel:", "ready" if reason is None else f"unavailable ({reason})")
