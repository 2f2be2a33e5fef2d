"""Which torch line a device plugin was built for, and what each line reads.

Cambricon builds torch_mlu once per torch line (its branches r1.22_pt2.1.0, r1.22_pt2.3.0,
r1.22_pt2.4.0; the public repository stops at 2.4), and the lines differ in what the
trainer depends on: the names of the collective error-handling variables (below) and the
loss scaler's class (Accelerate picks the right one, see `accelerator.create_accelerator`).
"""

from __future__ import annotations

import importlib.util
import re
import sys

# NOTE: torch_mlu's version names its torch line: scripts/release/build.property holds
# "1.22.2-torch2.1.0" (the wheel says "1.22.2+torch2.1.0").
_PLUGIN_TORCH = re.compile(r"torch(\d+)\.(\d+)")
# NOTE: torch_mlu/csrc/framework/distributed/process_group_cncl.hpp: the 2.1 line reads
# CNCL_ASYNC_ERROR_HANDLING / CNCL_BLOCKING_WAIT only; pt2.3 and pt2.4 read TORCH_CNCL_*, then
# TORCH_NCCL_*, then NCCL_* (the first one set wins). Both default to off.
CNCL_ERROR_VARIABLES = {
    "2.1": {"async": "CNCL_ASYNC_ERROR_HANDLING", "blocking": "CNCL_BLOCKING_WAIT"},
    "2.3": {"async": "TORCH_CNCL_ASYNC_ERROR_HANDLING", "blocking": "TORCH_CNCL_BLOCKING_WAIT"},
}
# NOTE: torch 2.2 renamed NCCL_* to TORCH_NCCL_* (ProcessGroupNCCL.hpp), reading the old names too.
NCCL_ERROR_VARIABLES = {
    "2.1": {"async": "NCCL_ASYNC_ERROR_HANDLING", "blocking": "NCCL_BLOCKING_WAIT"},
    "2.2": {"async": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "blocking": "TORCH_NCCL_BLOCKING_WAIT"},
}


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "2.1.2+cpu"."""
    parts = re.findall(r"\d+", version.split("+")[0])[:2]
    return (int(parts[0]), int(parts[1])) if len(parts) == 2 else (0, 0)


def torch_version() -> tuple[int, int]:
    import torch

    return version_tuple(torch.__version__)


def plugin_version(plugin: str) -> str | None:
    """The version an imported (or importable) plugin reports, or None when it is absent."""
    if plugin not in sys.modules and importlib.util.find_spec(plugin) is None:
        return None
    try:
        module = sys.modules.get(plugin) or importlib.import_module(plugin)
    except Exception:  # noqa: BLE001 - a broken plugin reports no version
        return None
    return str(getattr(module, "__version__", "unknown"))


def plugin_torch_line(version: str | None) -> tuple[int, int] | None:
    """The torch (major, minor) a plugin version names ("1.22.2-torch2.1.0" -> (2, 1)), or None."""
    match = _PLUGIN_TORCH.search(version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def mlu_line() -> str:
    """The torch_mlu line in force: "2.1" or "2.3" (2.3 and later read the same names).

    The plugin's own version decides where it names its torch, else the installed torch.
    """
    line = plugin_torch_line(plugin_version("torch_mlu")) or torch_version()
    return "2.1" if line < (2, 3) else "2.3"


def error_variables(device_type: str) -> dict[str, str]:
    """The async-error-handling and blocking-wait variables the device's collectives read."""
    if device_type == "mlu":
        return CNCL_ERROR_VARIABLES[mlu_line()]
    if device_type == "cuda":
        return NCCL_ERROR_VARIABLES["2.1" if torch_version() < (2, 2) else "2.2"]
    return {}


def other_spellings(device_type: str, kind: str) -> list[str]:
    """The same setting's names on the device's other lines (a user may have set any of them)."""
    tables = {"mlu": CNCL_ERROR_VARIABLES, "cuda": NCCL_ERROR_VARIABLES}.get(device_type, {})
    mine = error_variables(device_type).get(kind)
    return [names[kind] for names in tables.values() if names[kind] != mine]
