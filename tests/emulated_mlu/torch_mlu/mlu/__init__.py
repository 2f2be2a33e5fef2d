"""``torch.mlu``: the device module of the emulated MLU.

Mirrors the part of ``torch.cuda`` that torch_mlu provides and that Accelerate
and the trainer call. Kernels run synchronously on the host, so
synchronisation is a no-op and events time real host work. Device properties
describe an MLU370 (no bf16).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from torch_mlu.mlu import amp  # noqa: F401  (torch.mlu.amp.* deprecated aliases)

__all__ = [
    "Event",
    "Stream",
    "current_device",
    "current_stream",
    "default_stream",
    "device",
    "device_count",
    "empty_cache",
    "get_amp_supported_dtype",
    "get_device_capability",
    "get_device_name",
    "get_device_properties",
    "get_rng_state",
    "get_rng_state_all",
    "init",
    "initial_seed",
    "is_available",
    "is_bf16_supported",
    "is_initialized",
    "manual_seed",
    "manual_seed_all",
    "max_memory_allocated",
    "max_memory_reserved",
    "mem_get_info",
    "memory_allocated",
    "memory_reserved",
    "memory_stats",
    "reset_max_memory_allocated",
    "reset_peak_memory_stats",
    "seed",
    "seed_all",
    "set_device",
    "set_rng_state",
    "set_rng_state_all",
    "reset_transfer_stats",
    "stream",
    "synchronize",
    "transfer_stats",
    "visible_device_count",
]

DeviceLike = torch.device | str | int | None

_DEVICE_NAME = "MLU370-X8 (emulated)"
_TOTAL_MEMORY_BYTES = 24 * 1024**3  # one MLU370-X8 chip
_CAPABILITY = (3, 0)  # MLU370; bf16 needs 5.x


def _ops() -> Any:
    return torch.ops.emulated_mlu


def _index(device: DeviceLike = None, optional: bool = True) -> int:
    """Return the device index meant by ``device`` (current one when None)."""
    if device is None:
        return current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "mlu":
        raise ValueError(f"expected an mlu device, got {device}")
    if device.index is None:
        if not optional:
            raise ValueError(f"expected an mlu device with an index, got {device}")
        return current_device()
    return device.index


# --------------------------------------------------------------- devices


def visible_device_count() -> int:
    """Return how many emulated MLUs this process sees.

    ``CN_VISIBLE_DEVICES`` (then ``MLU_VISIBLE_DEVICES``), when set, gives the
    count of ids it lists, as Accelerate's ``--gpu_ids`` expects; otherwise
    ``EMULATED_MLU_DEVICE_COUNT`` (default 2).
    """
    for variable in ("CN_VISIBLE_DEVICES", "MLU_VISIBLE_DEVICES"):
        listed = os.environ.get(variable)
        if listed is not None:
            return len([part for part in listed.split(",") if part.strip()])
    return int(os.environ.get("EMULATED_MLU_DEVICE_COUNT", "2"))


def is_available() -> bool:
    """Return True when at least one emulated MLU is visible."""
    return device_count() > 0


def device_count() -> int:
    """Return the number of visible emulated MLUs."""
    return int(_ops().device_count())


def current_device() -> int:
    """Return the index of this thread's current MLU."""
    return int(_ops().current_device())


def set_device(device: DeviceLike) -> None:
    """Make ``device`` this thread's current MLU (new tensors land there)."""
    index = _index(device)
    if index >= 0:
        _ops().set_device(index)


class device:  # noqa: N801  (mirrors torch.cuda.device)
    """Context manager that switches the current MLU and restores it on exit.

    Args:
        device: Device index or mlu device to switch to.
    """

    def __init__(self, device: DeviceLike) -> None:
        self.index = _index(device) if device is not None else -1
        self.previous = -1

    def __enter__(self) -> None:
        self.previous = current_device()
        if self.index >= 0:
            set_device(self.index)

    def __exit__(self, *exc_info: object) -> None:
        if self.index >= 0:
            set_device(self.previous)


def synchronize(device: DeviceLike = None) -> None:
    """Wait for the device to finish: kernels are synchronous, so only counted."""
    _index(device)
    _ops().synchronize()


# -------------------------------------------------------------- traffic

_TRAFFIC_KEYS = (
    "h2d_copies",
    "h2d_bytes",
    "h2d_blocking",
    "d2h_copies",
    "d2h_bytes",
    "d2h_blocking",
    "scalar_reads",
    "sync_calls",
)


def transfer_stats() -> dict[str, int]:
    """Return the host<->device traffic counted since the last reset, all devices together.

    Not part of the real torch_mlu: a test double's window on what a device would see.

    * ``h2d_*`` / ``d2h_*``: copies from host to device and back, their bytes, and how
      many of them were blocking (``non_blocking=False``: the host waits for the device);
    * ``scalar_reads``: ``.item()``, ``bool(t)``, ... on a device tensor (a wait plus a
      few bytes back, counted in ``d2h_bytes`` only);
    * ``sync_calls``: ``torch.mlu.synchronize()``, stream and event synchronization;
    * ``syncs``: every point where the host waits for the device: blocking copies,
      scalar reads and synchronize calls.

    The emulation's own staging (operands moved to host for the CPU kernels, collectives
    over gloo) is not counted: a real device does not do it.
    """
    stats = dict(zip(_TRAFFIC_KEYS, (int(v) for v in _ops().transfer_stats())))
    stats["syncs"] = stats["h2d_blocking"] + stats["d2h_blocking"] + stats["scalar_reads"] + stats["sync_calls"]
    return stats


def reset_transfer_stats() -> None:
    """Zero the counters of :func:`transfer_stats`."""
    _ops().reset_transfer_stats()


def is_initialized() -> bool:
    """Return True: the emulated runtime is ready as soon as it is imported."""
    return True


def init() -> None:
    """Initialise the runtime (nothing to do)."""


def _lazy_init() -> None:
    """Initialise lazily, as torch.cuda does (nothing to do)."""


def _is_in_bad_fork() -> bool:
    return False


def get_device_name(device: DeviceLike = None) -> str:
    """Return the marketing name of the emulated device."""
    _index(device)
    return _DEVICE_NAME


class _DeviceProperties:
    """Properties of one emulated MLU, shaped like ``torch.cuda``'s."""

    def __init__(self) -> None:
        self.name = _DEVICE_NAME
        self.total_memory = _TOTAL_MEMORY_BYTES
        self.major, self.minor = _CAPABILITY
        self.multi_processor_count = 16

    def __repr__(self) -> str:
        return (
            f"_MLUDeviceProperties(name='{self.name}', major={self.major}, "
            f"minor={self.minor}, "
            f"total_memory={self.total_memory // 1024**2}MB)"
        )


def get_device_properties(device: DeviceLike = None) -> _DeviceProperties:
    """Return name, total memory and compute capability of an MLU."""
    index = _index(device)
    if not 0 <= index < device_count():
        raise AssertionError(f"Invalid device id {index}")
    return _DeviceProperties()


def get_device_capability(device: DeviceLike = None) -> tuple[int, int]:
    """Return the (major, minor) compute capability (MLU370: 3.0)."""
    props = get_device_properties(device)
    return props.major, props.minor


def is_bf16_supported(including_emulation: bool = True) -> bool:
    """Return False: MLU370 has no bf16 (capability below 5)."""
    return False


def get_amp_supported_dtype() -> list[torch.dtype]:
    """Return the dtypes ``torch.autocast("mlu")`` accepts: fp16 and bf16, whatever the chip.

    NOTE: torch_mlu/mlu/autocast_utils.py returns both on every line, MLU370 included;
    only :func:`is_bf16_supported` tells an MLU370 (capability 3.x) apart.
    """
    return [torch.float16, torch.bfloat16]


# NOTE: torch_mlu/mlu/autocast_utils.py: the autocast state torch's autocast asks a custom
# device module for; torch 2.4 keeps it itself (by device name), torch 2.1 does not.
_TORCH_KEEPS_AUTOCAST_STATE = hasattr(torch, "get_autocast_dtype")


def is_autocast_enabled() -> bool:
    """Return whether autocast is on for mlu in this thread."""
    if _TORCH_KEEPS_AUTOCAST_STATE:
        return torch.is_autocast_enabled("mlu")
    return bool(_ops().autocast_enabled())


def set_autocast_enabled(enabled: bool) -> None:
    """Switch autocast for mlu on or off in this thread."""
    if _TORCH_KEEPS_AUTOCAST_STATE:
        torch.set_autocast_enabled("mlu", enabled)
    else:
        _ops().set_autocast_enabled(enabled)


def get_autocast_dtype() -> torch.dtype:
    """Return the dtype autocast casts to on mlu."""
    if _TORCH_KEEPS_AUTOCAST_STATE:
        return torch.get_autocast_dtype("mlu")
    return _ops().autocast_dtype()


def set_autocast_dtype(dtype: torch.dtype) -> None:
    """Set the dtype autocast casts to on mlu."""
    if _TORCH_KEEPS_AUTOCAST_STATE:
        torch.set_autocast_dtype("mlu", dtype)
    else:
        _ops().set_autocast_dtype(dtype)


# ---------------------------------------------------------------- memory


def memory_allocated(device: DeviceLike = None) -> int:
    """Return bytes currently held by tensors on the MLU."""
    return int(_ops().memory_allocated(_index(device)))


def max_memory_allocated(device: DeviceLike = None) -> int:
    """Return the peak of :func:`memory_allocated` since the last reset."""
    return int(_ops().max_memory_allocated(_index(device)))


def reset_peak_memory_stats(device: DeviceLike = None) -> None:
    """Restart peak tracking from the current allocation."""
    _ops().reset_peak_memory_stats(_index(device))


reset_max_memory_allocated = reset_peak_memory_stats

# No caching allocator: reserved memory is allocated memory.
memory_reserved = memory_allocated
max_memory_reserved = max_memory_allocated


def memory_stats(device: DeviceLike = None) -> dict[str, int]:
    """Return the counters above under ``torch.cuda.memory_stats`` keys."""
    return {
        "allocated_bytes.all.current": memory_allocated(device),
        "allocated_bytes.all.peak": max_memory_allocated(device),
        "reserved_bytes.all.current": memory_reserved(device),
        "reserved_bytes.all.peak": max_memory_reserved(device),
    }


def mem_get_info(device: DeviceLike = None) -> tuple[int, int]:
    """Return (free, total) bytes of the emulated device."""
    used = memory_allocated(device)
    return max(_TOTAL_MEMORY_BYTES - used, 0), _TOTAL_MEMORY_BYTES


def empty_cache() -> None:
    """Release cached blocks: nothing is cached, so a no-op."""


# -------------------------------------------------------------------- RNG
# NOTE: as torch_mlu/mlu/random.py, one generator per MLU, apart from the CPU's: the C++
# fallback lends its state to every random op on that device (csrc/emulated_mlu.cpp, RNG).


def get_rng_state(device: DeviceLike = "mlu") -> torch.Tensor:
    """Return the RNG state of one MLU as a ByteTensor."""
    return _ops().get_rng_state(_index(device))


def get_rng_state_all() -> list[torch.Tensor]:
    """Return the RNG states of all visible MLUs."""
    return [get_rng_state(i) for i in range(device_count())]


def set_rng_state(new_state: torch.Tensor, device: DeviceLike = "mlu") -> None:
    """Restore the RNG state of one MLU from :func:`get_rng_state` output."""
    _ops().set_rng_state(_index(device), new_state.detach().to("cpu", torch.uint8).contiguous())


def set_rng_state_all(new_states: list[torch.Tensor]) -> None:
    """Restore the RNG states of all MLUs, one state per device."""
    for index, state in enumerate(new_states):
        set_rng_state(state, index)


def manual_seed(seed: int) -> None:
    """Seed the current MLU's generator."""
    _ops().manual_seed(current_device(), int(seed) & 0x7FFF_FFFF_FFFF_FFFF)


def manual_seed_all(seed: int) -> None:
    """Seed every MLU's generator.

    ``torch.manual_seed`` calls this, so it must not call back into it.
    """
    for index in range(device_count()):
        _ops().manual_seed(index, int(seed) & 0x7FFF_FFFF_FFFF_FFFF)


def seed() -> None:
    """Seed the current MLU's generator with a random number."""
    _ops().manual_seed(current_device(), torch.Generator().seed() & 0x7FFF_FFFF_FFFF_FFFF)


def seed_all() -> None:
    """Seed every MLU's generator with one random number."""
    manual_seed_all(torch.Generator().seed() & 0x7FFF_FFFF_FFFF_FFFF)


def initial_seed() -> int:
    """Return the seed the current MLU's generator was last seeded with."""
    return int(_ops().initial_seed(current_device()))


# ------------------------------------------------------- streams and events


class Stream:
    """The single, synchronous stream of an emulated MLU.

    Args:
        device: MLU the stream belongs to (current one when None).
        priority: Accepted for API compatibility; ignored.
    """

    def __init__(self, device: DeviceLike = None, priority: int = 0) -> None:
        self.device = torch.device("mlu", _index(device))
        self.priority = priority

    def synchronize(self) -> None:
        """Wait for the stream's work: already done, so only counted."""
        _ops().synchronize()

    def query(self) -> bool:
        """Return True: all work is complete."""
        return True

    def wait_stream(self, stream: Stream) -> None:
        """Order after another stream: nothing to order."""

    def wait_event(self, event: Event) -> None:
        """Order after an event: nothing to order."""

    def record_event(self, event: Event | None = None) -> Event:
        """Record ``event`` (a new one when None) on this stream."""
        event = event or Event()
        event.record(self)
        return event

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stream) and other.device == self.device

    def __hash__(self) -> int:
        return hash(self.device)

    def __repr__(self) -> str:
        return f"<torch.mlu.Stream device={self.device} (emulated, synchronous)>"


def current_stream(device: DeviceLike = None) -> Stream:
    """Return the current (and only) stream of an MLU."""
    return Stream(device)


default_stream = current_stream


@contextlib.contextmanager
def stream(stream: Stream | None) -> Iterator[None]:
    """Run a block on ``stream``; with one synchronous stream, just runs it."""
    yield


def set_stream(stream: Stream) -> None:
    """Select a stream: there is only one."""


class Event:
    """An MLU event; with ``enable_timing`` it measures elapsed host time.

    Backed by ``torch.Event`` on the mlu device, whose C++ guard records a
    steady-clock timestamp: as kernels are synchronous, that is when all
    earlier work finished.

    Args:
        enable_timing: Whether :meth:`elapsed_time` may be called.
        blocking: Accepted for API compatibility; ignored.
        interprocess: Accepted for API compatibility; ignored.
    """

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.enable_timing = enable_timing
        # torch.Event arrived in torch 2.3; before it, the host clock is read here directly.
        self._event = (
            torch.Event(torch.device("mlu", current_device()), enable_timing=enable_timing)
            if hasattr(torch, "Event")
            else None
        )
        self._recorded_s = 0.0

    def record(self, stream: Stream | None = None) -> None:
        """Mark the point after all work issued so far."""
        if self._event is None:
            self._recorded_s = time.perf_counter()
        else:
            self._event.record()

    def wait(self, stream: Stream | None = None) -> None:
        """Make ``stream`` wait for this event: nothing to wait for."""

    def query(self) -> bool:
        """Return True: recorded work is always complete."""
        return True if self._event is None else self._event.query()

    def synchronize(self) -> None:
        """Block until the event completes: it already has."""
        if self._event is None:
            _ops().synchronize()
        else:
            self._event.synchronize()

    def elapsed_time(self, end_event: Event) -> float:
        """Return milliseconds between this event and ``end_event``."""
        if not (self.enable_timing and end_event.enable_timing):
            raise RuntimeError("Both events must be created with enable_timing=True")
        if self._event is None:
            return (end_event._recorded_s - self._recorded_s) * 1000.0
        return self._event.elapsed_time(end_event._event)
