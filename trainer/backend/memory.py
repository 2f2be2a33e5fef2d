"""Device memory and traffic statistics, where the device or its plugin keeps them."""

from __future__ import annotations

from typing import Any

from trainer.backend.devices import device_api, device_module


def _memory_fn(device_type: str, name: str) -> Any:
    """A memory-stats function from `torch.accelerator` or the device module, if any."""
    if device_type in ("cpu", "mps"):
        return None
    return getattr(device_api(device_type), name, None) or getattr(device_module(device_type), name, None)


def peak_memory_bytes(device_type: str) -> int:
    """Peak device memory allocated since `reset_peak_memory`; 0 where not tracked."""
    fn = _memory_fn(device_type, "max_memory_allocated")
    try:
        return int(fn()) if fn else 0
    except (RuntimeError, NotImplementedError):  # a device plugin without allocator stats
        return 0


def reset_peak_memory(device_type: str) -> None:
    fn = _memory_fn(device_type, "reset_peak_memory_stats")
    try:
        if fn:
            fn()
    except (RuntimeError, NotImplementedError):
        pass


def transfer_stats(device_type: str) -> dict[str, int] | None:
    """Host<->device copies, bytes and syncs counted by the device plugin, or None.

    Only plugins that count them expose `transfer_stats()` (the emulated MLU in
    tests/emulated_mlu does); stock CUDA and torch_mlu do not.
    """
    fn = getattr(device_module(device_type), "transfer_stats", None)
    return dict(fn()) if fn else None


def reset_transfer_stats(device_type: str) -> None:
    fn = getattr(device_module(device_type), "reset_transfer_stats", None)
    if fn:
        fn()
