"""Processes marked by an environment variable, for the launch benchmarks.

torchrun starts the training processes in sessions of their own, so killing the
launcher's process group leaves them running; a benchmark marks each launch with a
variable in its environment instead, and kills everything that carries it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def kill_marked(variable: str, marker: str) -> None:
    """SIGKILL every process whose environment has `variable=marker` (a launcher, its workers, their loaders)."""
    needle = f"{variable}={marker}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            continue
