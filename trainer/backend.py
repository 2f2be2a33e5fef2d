"""The one seam to the device: device type, process group, precision and device helpers.

Everything that names a device type (`mlu`, `cuda`, ...), calls a `torch.<device>` module
or picks a collective backend lives here, so that the same config and the same
`accelerate launch` command run on Cambricon MLUs (torch_mlu + cncl), CUDA (nccl) and
CPU (gloo). Accelerate does the device placement; this module makes sure it chose what
the user asked for, and says why and how to fix it when it did not.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import platform
import socket
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.errors import BackendError

if TYPE_CHECKING:
    import torch

# NOTE: order matters: `auto` takes the first available, MLU first as Accelerate does.
DEVICE_TYPES = ("mlu", "cuda", "npu", "xpu", "mps", "cpu")
PROCESS_GROUP_BACKENDS = {"mlu": "cncl", "cuda": "nccl", "npu": "hccl", "xpu": "xccl", "mps": "gloo", "cpu": "gloo"}
DISTRIBUTED_TYPES = {"mlu": "MULTI_MLU", "cuda": "MULTI_GPU", "npu": "MULTI_NPU", "xpu": "MULTI_XPU", "cpu": "MULTI_CPU"}
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


MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
# NOTE: with async error handling a collective past its timeout aborts the communicator and
# ends the process instead of waiting for ever; torch_mlu mirrors NCCL's variable (MLU_NOTES).
ASYNC_ERROR_HANDLING_VARS = {"mlu": "TORCH_CNCL_ASYNC_ERROR_HANDLING", "cuda": "TORCH_NCCL_ASYNC_ERROR_HANDLING"}


def _pin_names_device() -> bool:
    """NOTE: torch 2.9 made pinning follow the current accelerator and deprecated naming it."""
    import torch

    return tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 9)


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
        shown = {v: os.environ[v] for v in VISIBLE_DEVICES_VARS[requested] if v in os.environ}
        hint = f"; visible-device settings: {shown}" if shown else ""
    raise BackendError(f"backend.device={requested} is not available here (found: {', '.join(found)}){hint}")


def is_bf16_supported(device_type: str) -> bool:
    """Native bf16 support; on CPU, oneDNN's check for bf16 instructions."""
    if device_type == "cpu":
        import torch

        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    if device_type == "mps":
        return False
    module = device_module(device_type)
    check = getattr(module, "is_bf16_supported", None)
    return bool(check()) if check else False


def resolve_precision(requested: str, device_type: str) -> str:
    """Map `train.precision` to Accelerate's `mixed_precision` ("no", "fp16" or "bf16").

    auto gives bf16 where the device has it natively; otherwise fp16 with a loss scaler
    on accelerators (MLU370 has no bf16) and fp32 on CPU.
    """
    if requested == "auto":
        if is_bf16_supported(device_type):
            return "bf16"
        return "fp16" if device_type not in ("cpu", "mps") else "no"
    if requested == "bf16" and not is_bf16_supported(device_type):
        raise BackendError(f"train.precision=bf16: this {device_type} has no native bf16; use fp16 or fp32 (or auto)")
    if requested == "fp16" and device_type == "cpu":
        raise BackendError("train.precision=fp16 needs an accelerator; on cpu use bf16 (if supported) or fp32")
    return MIXED_PRECISION[requested]


def precision_name(mixed_precision: str) -> str:
    """Accelerate's `mixed_precision` ("no", "fp16", "bf16") as the config spells it."""
    return {v: k for k, v in MIXED_PRECISION.items()}[mixed_precision]


def visible_devices(device_type: str) -> dict[str, str]:
    """The visible-device variables set for this device type, in the order read."""
    return {v: os.environ[v] for v in VISIBLE_DEVICES_VARS.get(device_type, ()) if v in os.environ}


def pitfalls(device_type: str) -> list[str]:
    """Known misconfigurations that make a launch silently miss the MLU."""
    warnings = []
    mlu_vars = VISIBLE_DEVICES_VARS["mlu"]
    if importlib.util.find_spec("torch_mlu") and "CUDA_VISIBLE_DEVICES" in os.environ and not any(v in os.environ for v in mlu_vars):
        warnings.append("CUDA_VISIBLE_DEVICES is set but MLU_VISIBLE_DEVICES is not: torch_mlu only falls back to it; set MLU_VISIBLE_DEVICES to choose MLUs")
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and device_type != "cpu":
        warnings.append(
            f"ACCELERATE_USE_CPU is set (a launch config with `use_cpu: true`, as `accelerate config default` writes on MLU-only hosts in Accelerate 1.5-1.15) although a {device_type} is available; use configs/accelerate/*mlu*.yaml or set use_cpu: false"
        )
    if device_type == "mlu" and importlib.util.find_spec("torch_mlu") is None:
        warnings.append(f"torch_mlu is not installed on {socket.gethostname()}")
    return warnings


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

    # -- device helpers -------------------------------------------------------------
    def _api(self) -> Any:
        """`torch.accelerator` where it serves this device, else the `torch.<device>` module."""
        import torch

        acc = getattr(torch, "accelerator", None)
        try:
            current = acc.current_accelerator() if acc is not None else None
        except RuntimeError:
            current = None
        if current is not None and current.type == self.device_type:
            return acc
        return device_module(self.device_type)

    def synchronize(self) -> None:
        """Wait for queued device work, so a host clock read after it is meaningful."""
        if self.device_type != "cpu":
            self._api().synchronize()

    def _memory_fn(self, name: str) -> Any:
        """A memory-stats function from `torch.accelerator` or the device module, if any."""
        if self.device_type in ("cpu", "mps"):
            return None
        return getattr(self._api(), name, None) or getattr(device_module(self.device_type), name, None)

    def peak_memory_bytes(self) -> int:
        """Peak device memory allocated since `reset_peak_memory` (`trainer bench`); 0 where not tracked."""
        fn = self._memory_fn("max_memory_allocated")
        try:
            return int(fn()) if fn else 0
        except (RuntimeError, NotImplementedError):  # a device plugin without allocator stats
            return 0

    def reset_peak_memory(self) -> None:
        fn = self._memory_fn("reset_peak_memory_stats")
        try:
            if fn:
                fn()
        except (RuntimeError, NotImplementedError):
            pass

    @property
    def host_sync_is_free(self) -> bool:
        """True where reading a device value costs no lost overlap (the CPU computes synchronously)."""
        return self.device_type == "cpu"

    def timer(self) -> DeviceTimer:
        return DeviceTimer(self)

    def transfer_stats(self) -> dict[str, int] | None:
        """Host<->device copies, bytes and syncs counted by the device plugin, or None.

        Only plugins that count them expose `transfer_stats()` (the emulated MLU in
        tests/emulated_mlu does); stock CUDA and torch_mlu do not.
        """
        fn = getattr(device_module(self.device_type), "transfer_stats", None)
        return dict(fn()) if fn else None

    def reset_transfer_stats(self) -> None:
        fn = getattr(device_module(self.device_type), "reset_transfer_stats", None)
        if fn:
            fn()

    def supports_fused_optimizer(self) -> bool:
        """Whether this device runs torch's fused SGD kernel (probed once on a 1-element step).

        NOTE: with a loss scaler, only a fused optimizer skips an overflowing step on the
        device; any other makes GradScaler read the inf check back with `.item()`, a host
        sync every step. Plugins need not implement the kernel, hence the probe.
        """
        import torch

        try:
            param = torch.zeros(1, device=self.device)
            torch._fused_sgd_(
                [param],
                [torch.ones_like(param)],
                [],
                weight_decay=0.0,
                momentum=0.0,
                lr=0.1,
                dampening=0.0,
                nesterov=False,
                maximize=False,
                is_first_step=False,
                found_inf=torch.zeros(1, device=self.device),
            )
            return True
        except (RuntimeError, NotImplementedError, AttributeError, TypeError):
            return False

    def pin_memory_kwargs(self, enabled: bool = True) -> dict[str, Any]:
        """DataLoader pinning arguments: pinned host memory on accelerators only (`data.pin_memory`).

        Torch before 2.9 pins for CUDA unless told otherwise, so other devices get an
        explicit `pin_memory_device`; newer torch pins for the current accelerator and
        deprecates the argument.
        """
        if not enabled or self.device_type in ("cpu", "mps"):
            return {"pin_memory": False}
        if not _can_pin(self.device_type):
            return {"pin_memory": False}
        if self.device_type != "cuda" and _pin_names_device():
            return {"pin_memory": True, "pin_memory_device": self.device_type}
        return {"pin_memory": True}

    @property
    def precision(self) -> str:
        """The precision as the config spells it: fp32, fp16 or bf16."""
        return precision_name(self.mixed_precision)

    @property
    def on_host(self) -> bool:
        """True when the model runs on the CPU, beside the loader workers."""
        return self.device_type == "cpu"


def _can_pin(device_type: str) -> bool:
    import torch

    try:
        torch.empty(1).pin_memory(device_type) if _pin_names_device() else torch.empty(1).pin_memory()
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


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


def retain_freed_host_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    A training step on the CPU allocates and frees its activations, gigabytes for a
    ResNet50 at 224 px. With glibc's defaults the large blocks are mmap'd and unmapped
    every step, so each step page-faults its activations in again as fresh zeroed pages
    (measured on 2 cores, ResNet50 at batch 16: 0.1-0.7 million faults and up to 2.5 s
    of system time per step). Serving them from a heap that is never trimmed costs none of
    that; the process keeps its peak footprint, as a training process does anyway.

    Returns whether it took effect: False off glibc (musl, macOS, Windows).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def init_restarted_process_group(device_type: str, timeout_s: float) -> bool:
    """After a torchrun restart, form the process group on a store prefixed by the attempt.

    NOTE: torchrun's static rendezvous (the `rdzv_backend: static` of the shipped launch
    configs) serves one store for all restarts, and the process group's keys carry no
    attempt number: a restarted group reads the addresses the dead processes published
    and fails ("Gloo connectFullMesh failed ... Connection refused"). Forming the group
    here, before Accelerate would, keys it by `TORCHELASTIC_RESTART_COUNT`; Accelerate then
    uses it as it is. Returns whether it formed one.
    """
    env = os.environ
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    world_size = int(env.get("WORLD_SIZE", "1"))
    if attempt == 0 or world_size < 2 or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in env:
        return False
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, is_master=False, timeout=timeout)
    dist.init_process_group(
        PROCESS_GROUP_BACKENDS[device_type],
        store=dist.PrefixStore(f"trainer/attempt_{attempt}", store),
        rank=int(env["RANK"]),
        world_size=world_size,
        timeout=timeout,
    )
    return True


def create_accelerator(
    device: str, precision: str, host_memory: str = "auto", collective_timeout_s: float = 300.0, **accelerator_kwargs: Any
) -> tuple[Any, Backend]:
    """Build the Accelerator on the requested device and check Accelerate agrees.

    Args:
        device: `backend.device` (auto, mlu, cuda, ..., cpu).
        precision: `train.precision` (auto, fp32, fp16, bf16).
        host_memory: `backend.host_memory`: `retain` keeps freed host memory for reuse
            (`retain_freed_host_memory`), `release` leaves the C library's defaults, and
            `auto` retains when the model runs on the CPU, where the activations live.
        collective_timeout_s: `backend.collective_timeout_s`, the process group's timeout
            (gloo's default is 30 min, NCCL's 10); on MLU and CUDA async error handling is
            switched on (unless set already) so that a stuck collective aborts.
        **accelerator_kwargs: passed to `accelerate.Accelerator`.

    Raises:
        BackendError: when the device is missing, the precision is unsupported, or
            Accelerate chose another device or process group than the one resolved.
    """
    device_type = resolve_device_type(device)  # imports torch_mlu before Accelerate's state
    mixed_precision = resolve_precision(precision, device_type)
    wants_retained = host_memory == "retain" or (host_memory == "auto" and device_type == "cpu")
    retained = wants_retained and retain_freed_host_memory()
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if device_type in ASYNC_ERROR_HANDLING_VARS:
        os.environ.setdefault(ASYNC_ERROR_HANDLING_VARS[device_type], "1")
    init_restarted_process_group(device_type, collective_timeout_s)
    handlers = [*accelerator_kwargs.pop("kwargs_handlers", []), InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s))]
    with warnings.catch_warnings():
        # Accelerate builds the deprecated `torch.mlu.amp.GradScaler`; it is replaced below.
        warnings.filterwarnings("ignore", message=r".*amp\.GradScaler.*deprecated")
        accelerator = Accelerator(cpu=device_type == "cpu", mixed_precision=mixed_precision, kwargs_handlers=handlers, **accelerator_kwargs)
    if mixed_precision == "fp16" and accelerator.scaler is not None:
        # NOTE: Accelerate builds the deprecated `torch.mlu.amp.GradScaler` on MLU.
        accelerator.scaler = torch.amp.GradScaler(device_type, **(accelerator.scaler_handler.to_kwargs() if accelerator.scaler_handler else {}))
    state = accelerator.state
    backend = Backend(
        device_type=device_type,
        device=accelerator.device,
        mixed_precision=accelerator.mixed_precision,
        num_processes=accelerator.num_processes,
        distributed_type=str(state.distributed_type).split(".")[-1],
        process_group_backend=getattr(state, "backend", None),
        host_memory="retain" if retained else "release",
    )
    check_accelerator_state(backend, local_rank=accelerator.local_process_index)
    return accelerator, backend


def check_accelerator_state(backend: Backend, local_rank: int) -> None:
    """Fail with cause and fix when Accelerate's device or process group is not ours."""
    expected = backend.device_type
    problems = []
    if backend.device.type != expected:
        problems.append(f"Accelerate placed this process on {backend.device}, not {expected}")
    if backend.num_processes > 1:
        want_dist = DISTRIBUTED_TYPES.get(expected)
        want_pg = PROCESS_GROUP_BACKENDS.get(expected)
        if want_dist and backend.distributed_type != want_dist:
            problems.append(f"distributed type is {backend.distributed_type}, expected {want_dist}")
        if want_pg and backend.process_group_backend != want_pg:
            problems.append(f"process group backend is {backend.process_group_backend}, expected {want_pg}")
        if expected != "cpu" and backend.device.index not in (None, local_rank % max(device_count(expected), 1)):
            problems.append(f"device is {backend.device}, expected {expected}:{local_rank}")
    if problems:
        causes = pitfalls(expected) or ["the launch config does not match this host; use the shipped configs/accelerate/ file for this device"]
        raise BackendError("; ".join(problems) + ". Likely cause: " + " | ".join(causes))
