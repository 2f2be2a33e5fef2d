"""`trainer env`: what a launch will use (device, process group, precision), versions and pitfalls.

It imports torch and the device plugins (through `trainer.backend`), nothing more, so it
answers in the time torch takes to import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import socket
import sys
from typing import Any

from trainer.backend import (
    DISTRIBUTED_TYPES,
    PROCESS_GROUP_BACKENDS,
    BackendError,
    available_device_types,
    device_count,
    import_device_plugins,
    is_bf16_supported,
    pitfalls,
    precision_name,
    resolve_device_type,
    resolve_precision,
    visible_devices,
)


def package_version(name: str) -> str | None:
    """An installed package's version, without importing it unless it is imported already; None if absent."""
    if name in sys.modules:
        return getattr(sys.modules[name], "__version__", "unknown")
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):  # an import hook that refuses it, or a half-removed package
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def environment_report(device: str = "auto", precision: str = "auto") -> dict[str, Any]:
    """What `trainer env` prints: the resolved device picture, versions and pitfalls."""
    plugin_errors = import_device_plugins()
    found = available_device_types()
    report: dict[str, Any] = {"host": socket.gethostname(), "available_devices": found}
    try:
        device_type = resolve_device_type(device)
        report["device_type"] = device_type
        report["device_count"] = device_count(device_type)
        report["visible_devices"] = visible_devices(device_type)
        report["process_group_backend"] = PROCESS_GROUP_BACKENDS.get(device_type)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        report["processes"] = world
        report["distributed_type"] = DISTRIBUTED_TYPES.get(device_type) if world > 1 else "NO"
        mixed = resolve_precision(precision, device_type)
        report["precision"] = precision_name(mixed)
        report["bf16_supported"] = is_bf16_supported(device_type)
    except BackendError as err:
        device_type = device
        report["error"] = str(err)
    report["versions"] = {
        name: package_version(name) for name in ("torch", "torch_mlu", "accelerate", "timm", "datasets", "torchvision")
    }
    report["warnings"] = pitfalls(device_type) + [f"import {k} failed: {v}" for k, v in plugin_errors.items()]
    return report


def format_environment(report: dict[str, Any]) -> str:
    """`environment_report` as the table `trainer env` prints (`--json` prints the report itself)."""
    yes_no = {True: "yes", False: "no"}
    rows = [("host", report["host"]), ("available devices", ", ".join(report["available_devices"]))]
    if "error" in report:
        rows.append(("error", report["error"]))
    else:
        visible = ", ".join(f"{k}={v}" for k, v in report["visible_devices"].items()) or "not set"
        world = report["processes"]
        rows += [
            ("device", f"{report['device_type']} x {report['device_count']} (visible-device variables: {visible})"),
            (
                "processes",
                "1 process, not distributed" if world == 1 else f"{world} processes, {report['distributed_type']}",
            ),
            ("process group", report["process_group_backend"] or "none"),
            ("precision", f"{report['precision']} (native bf16: {yes_no[report['bf16_supported']]})"),
        ]
    rows += [(f"{name}", version or "not installed") for name, version in report["versions"].items()]
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {value}" for key, value in rows]
    return "\n".join(lines + [f"warning: {w}" for w in report["warnings"]])
