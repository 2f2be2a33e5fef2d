"""What the benchmark scripts share: the machine they ran on, two-process launches, and
killing what a launch started.

torchrun starts the training processes in sessions of their own, so killing the
launcher's process group leaves them running; a benchmark marks each launch with a
variable in its environment instead, and kills everything that carries it.

The scripts run as `python benchmarks/<name>.py` and import this file as a sibling module.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine() -> dict[str, str]:
    """The CPU kind and what decides `precision: auto` on it, for the head of a results file."""
    import torch

    from trainer.backend import is_bf16_supported, resolve_precision

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    return {
        "cpu": fields.get("Model name", platform.processor()).strip(),
        "cores": str(len(os.sched_getaffinity(0))),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "native_bf16": str(is_bf16_supported("cpu")),
        "fast_path_precision": {"no": "fp32"}.get(resolve_precision("auto", "cpu"), "bf16"),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def free_port() -> int:
    """A loopback port nobody listens on now, for an `accelerate launch` rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_launcher() -> list[str]:
    """`accelerate launch` of two CPU processes (configs/accelerate/cpu_2proc.yaml) on a free port, up to `-m`."""
    config = str(REPO / "configs/accelerate/cpu_2proc.yaml")
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config,
        "--main_process_port",
        str(free_port()),
        "-m",
    ]


def kill_marked(variable: str, marker: str) -> None:
    """SIGKILL every process whose environment has `variable=marker` (a launcher, its workers, their loaders)."""
    needle = f"{variable}={marker}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            continue
