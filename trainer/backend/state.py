"""`Backend`: the resolved device picture, and the device helpers the trainer calls."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.backend import fused, host_memory, memory
from trainer.backend.devices import synchronize
from trainer.backend.precision import precision_name

if TYPE_CHECKING:
    import torch


@dataclass
class Backend:
    """The resolved device picture, and the device helpers the trainer calls."""

    device_type: str
    device: torch.device
    mixed_precision: str
    num_processes: int
    distributed_type: str
    process_group_backend: str | None
    host_memory: str = "release"
    """"retain" when glibc keeps freed host memory for reuse (`retain_freed_host_memory`)."""

    def synchronize(self) -> None:
        """Wait for queued device work, so a host clock read after it is meaningful."""
        synchronize(self.device_type)

    def peak_memory_bytes(self) -> int:
        """Peak device memory allocated since `reset_peak_memory` (`trainer bench`); 0 where not tracked."""
        return memory.peak_memory_bytes(self.device_type)

    def reset_peak_memory(self) -> None:
        memory.reset_peak_memory(self.device_type)

    @property
    def host_sync_is_free(self) -> bool:
        """True where reading a device value costs no lost overlap (the CPU computes synchronously)."""
        return self.device_type == "cpu"

    def timer(self) -> DeviceTimer:
        return DeviceTimer(self)

    def transfer_stats(self) -> dict[str, int] | None:
        """Host<->device copies, bytes and syncs counted by the device plugin, or None."""
        return memory.transfer_stats(self.device_type)

    def reset_transfer_stats(self) -> None:
        memory.reset_transfer_stats(self.device_type)

    def supports_fused_optimizer(self) -> bool:
        """Whether this device runs torch's fused SGD kernel (`fused.supports_fused_optimizer`)."""
        return fused.supports_fused_optimizer(self.device)

    def pin_memory_kwargs(self, enabled: bool = True) -> dict[str, Any]:
        """DataLoader pinning arguments (`host_memory.pin_memory_kwargs`)."""
        return host_memory.pin_memory_kwargs(self.device_type, enabled)

    @property
    def precision(self) -> str:
        """The precision as the config spells it: fp32, fp16 or bf16."""
        return precision_name(self.mixed_precision)

    @property
    def on_host(self) -> bool:
        """True when the model runs on the CPU, beside the loader workers."""
        return self.device_type == "cpu"


class DeviceTimer:
    """Wall time of device work: syncs the device before reading the host clock."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.start_s = 0.0

    def __enter__(self) -> DeviceTimer:
        self.backend.synchronize()
        self.start_s = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.backend.synchronize()
        self.elapsed_s = time.perf_counter() - self.start_s
