"""Builds (once) and loads the C++ half of the emulated MLU.

The build goes through ``torch.utils.cpp_extension.load`` into a directory
named after a hash of the source, the compile flags and the torch/Python
versions, so a changed source or a new torch gets a fresh build while every
later import loads the finished shared object directly (well under a second,
without importing ``cpp_extension`` or running ninja at all).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

_SOURCE = Path(__file__).resolve().parent / "csrc" / "emulated_mlu.cpp"
_NAME = "torch_mlu_emulated_C"
# -O0: the file is glue around libtorch kernels, so optimising it gains
# nothing measurable and costs cold-build time on small CI machines.
_CFLAGS = ["-O0", "-w"]
# torch before 2.4 has narrower allocator, guard and hooks interfaces (see the .cpp).
if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 4):
    _CFLAGS.append("-DEMULATED_MLU_LEGACY_TORCH")
_DONE_MARKER = "BUILD_OK"
# cpp_extension serialises builds with a lock file that a killed build leaves
# behind, after which every later import would wait for it forever.
_STALE_LOCK_S = 600


def build_directory() -> Path:
    """Return the cache directory for the current source and torch version.

    ``TORCH_EXTENSIONS_DIR`` overrides the root (default
    ``~/.cache/trainer-emulated-mlu``).
    """
    digest = hashlib.sha256()
    digest.update(_SOURCE.read_bytes())
    for part in (torch.__version__, sys.version, " ".join(_CFLAGS)):
        digest.update(part.encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "trainer-emulated-mlu"
    return Path(root) / digest.hexdigest()[:16]


def load() -> Any:
    """Load the compiled library, compiling it first if not cached.

    The library registers its kernels, device guard and hooks when loaded and
    has no Python bindings of its own (no pybind11: a shorter cold build).

    Returns:
        ``torch.ops.emulated_mlu``: device count, current device and memory
        counters of the emulated devices.
    """
    build_dir = build_directory()
    library = build_dir / f"{_NAME}.so"
    # The marker is written only after a complete build, so a process that
    # races another one's link step never loads a half-written library.
    if (build_dir / _DONE_MARKER).exists() and library.exists():
        torch.ops.load_library(str(library))
        return torch.ops.emulated_mlu

    from torch.utils import cpp_extension  # slow import: cold path only

    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    started = time.monotonic()
    cpp_extension.load(
        name=_NAME,
        sources=[str(_SOURCE)],
        extra_cflags=_CFLAGS,
        build_directory=str(build_dir),
        with_cuda=False,
        is_python_module=False,
        verbose=bool(os.environ.get("EMULATED_MLU_VERBOSE_BUILD")),
    )
    marker = build_dir / f"{_DONE_MARKER}.{os.getpid()}"
    marker.write_text(f"built in {time.monotonic() - started:.1f} s\n")
    marker.replace(build_dir / _DONE_MARKER)
    return torch.ops.emulated_mlu
