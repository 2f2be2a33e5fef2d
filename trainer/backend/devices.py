"""Device types: their names, plugins, collective backends, discovery and the device API.

Every table that maps a device type to what goes with it (process group, Accelerate's
distributed type, visible-device variables, the plugin that registers it) is here.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
from typing import Any

from trainer.errors import BackendError

# NOTE: order matters: `auto` takes the first available, MLU first as Accelerate does.
DEVICE_TYPES = ("mlu", "cuda", "npu", "xpu", "mps", "cpu")
PROCESS_GROUP_BACKENDS = {"mlu": "cncl", "cuda": "nccl", "npu": "hccl", "xpu": "xccl", "mps": "gloo", "cpu": "gloo"}
DISTRIBUTED_TYPES = {
    "mlu": "MULTI_MLU",
    "cuda": "MULTI_GPU",
    "npu": "MULTI_NPU",
    "xpu": "MULTI_XPU",
    "cpu": "MULTI_CPU",
}
# Plugins that register an out-of-tree device with PyTorch on import.
DEVICE_PLUGINS = {"mlu": "torch_mlu", "npu": "torch_npu"}
# Visible-device variables in the order the runtime reads them (torch_mlu: CN_, then MLU_).
VISIBLE_DEVICES_VARS = {
    "mlu": ("CN_VISIBLE_DEVICES", "MLU_VISIBLE_DEVICES"),
    "cuda": ("CUDA_VISIBLE_DEVICES",),
    "npu": ("ASCEND_RT_VISIBLE_DEVICES",),
    "xpu": ("ZE_AFFINITY_MASK",),
}
# NOTE: main.py (pytorch/examples imagenet) defaults to nccl, i.e. CUDA.
REFERENCE_DEFAULT_PROCESS_GROUP = "nccl"
HOST_DEVICE_TYPE = "cpu"  # the device with no accelerator: its process group is gloo


def device_for_process_group(process_group: str) -> str | None:
    """The device a collective backend implies (gloo: cpu), or None for one no device uses."""
    by_group = {pg: device for device, pg in PROCESS_GROUP_BACKENDS.items()}  # cpu, listed last, wins gloo
    return by_group.get(process_group)


def import_device_plugins() -> dict[str, str]:
    """Import installed device plugins (torch_mlu, ...) before Accelerate builds its state.

    Returns:
        A map from plugin name to the import error, for plugins present but broken.
    """
    errors = {}
    for plugin in DEVICE_PLUGINS.values():
        if importlib.util.find_spec(plugin) is None:
            continue
        try:
            importlib.import_module(plugin)
        except Exception as err:  # noqa: BLE001 - a broken plugin must not hide the others
            errors[plugin] = f"{type(err).__name__}: {err}"
    return errors


def device_module(device_type: str) -> Any:
    """The `torch.<device>` module, or None when this torch has no such device."""
    import torch

    return getattr(torch, device_type, None) if device_type != "cpu" else None


def device_api(device_type: str) -> Any:
    """`torch.accelerator` where it serves this device, else the `torch.<device>` module."""
    import torch

    acc = getattr(torch, "accelerator", None)
    try:
        current = acc.current_accelerator() if acc is not None else None
    except RuntimeError:
        current = None
    if current is not None and current.type == device_type:
        return acc
    return device_module(device_type)


def is_device_available(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    if device_type == "mps":
        import torch

        return torch.backends.mps.is_available()
    module = device_module(device_type)
    try:
        return bool(module is not None and module.is_available())
    except Exception:  # noqa: BLE001 - a driver error means "not usable here"
        return False


def device_count(device_type: str) -> int:
    if device_type in ("cpu", "mps"):
        return 1
    return device_module(device_type).device_count() if is_device_available(device_type) else 0


def available_device_types() -> list[str]:
    import_device_plugins()
    return [d for d in DEVICE_TYPES if is_device_available(d)]


def visible_devices(device_type: str) -> dict[str, str]:
    """The visible-device variables set for this device type, in the order read."""
    return {v: os.environ[v] for v in VISIBLE_DEVICES_VARS.get(device_type, ()) if v in os.environ}


def resolve_device_type(requested: str) -> str:
    """Map `backend.device` (auto or a type) to an available device type.

    Raises:
        BackendError: when the requested type is not available, naming what was found.
    """
    errors = import_device_plugins()
    found = available_device_types()
    if requested == "auto":
        return found[0]
    if requested in found:
        return requested
    hint = ""
    plugin = DEVICE_PLUGINS.get(requested)
    if plugin and plugin in errors:
        hint = f"; `import {plugin}` failed: {errors[plugin]}"
    elif plugin and importlib.util.find_spec(plugin) is None:
        hint = f"; {plugin} is not installed on {socket.gethostname()}"
    elif requested in VISIBLE_DEVICES_VARS:
        shown = visible_devices(requested)
        hint = f"; visible-device settings: {shown}" if shown else ""
    raise BackendError(f"backend.device={requested} is not available here (found: {', '.join(found)}){hint}")


def synchronize(device_type: str) -> None:
    """Wait for queued device work, so a host clock read after it is meaningful."""
    if device_type != "cpu":
        device_api(device_type).synchronize()
