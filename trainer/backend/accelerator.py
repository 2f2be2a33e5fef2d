"""Accelerate's set-up on the resolved device, and the checks that it agrees with us."""

from __future__ import annotations

import importlib.util
import os
import socket
import warnings
from typing import Any

from trainer.backend.devices import (
    DISTRIBUTED_TYPES,
    PROCESS_GROUP_BACKENDS,
    VISIBLE_DEVICES_VARS,
    device_count,
    resolve_device_type,
)
from trainer.backend.host_memory import retain_freed_host_memory
from trainer.backend.precision import resolve_precision
from trainer.backend.process_group import enable_collective_error_handling, init_restarted_process_group
from trainer.backend.state import Backend
from trainer.errors import BackendError

_LAUNCH_MISMATCH = " ".join(
    (
        "the launch config does not match this host;",
        "use the shipped configs/accelerate/ file for this device",
    )
)
_CUDA_VARS_ON_MLU = " ".join(
    (
        "CUDA_VISIBLE_DEVICES is set but MLU_VISIBLE_DEVICES is not: torch_mlu only falls back to it;",
        "set MLU_VISIBLE_DEVICES to choose MLUs",
    )
)


def pitfalls(device_type: str) -> list[str]:
    """Known misconfigurations that make a launch silently miss the MLU."""
    found = []
    mlu_chosen = any(v in os.environ for v in VISIBLE_DEVICES_VARS["mlu"])
    if importlib.util.find_spec("torch_mlu") and "CUDA_VISIBLE_DEVICES" in os.environ and not mlu_chosen:
        found.append(_CUDA_VARS_ON_MLU)
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and device_type != "cpu":
        found.append(
            "ACCELERATE_USE_CPU is set (a launch config with `use_cpu: true`, as `accelerate config default` writes "
            f"on MLU-only hosts in Accelerate 1.5-1.15) although a {device_type} is available; "
            "use configs/accelerate/*mlu*.yaml or set use_cpu: false"
        )
    if device_type == "mlu" and importlib.util.find_spec("torch_mlu") is None:
        found.append(f"torch_mlu is not installed on {socket.gethostname()}")
    return found


def create_accelerator(
    device: str,
    precision: str,
    host_memory: str = "auto",
    collective_timeout_s: float = 300.0,
    **accelerator_kwargs: Any,
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

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    enable_collective_error_handling(device_type)
    init_restarted_process_group(device_type, collective_timeout_s)
    handlers = [
        *accelerator_kwargs.pop("kwargs_handlers", []),
        InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s)),
    ]
    with warnings.catch_warnings():
        # NOTE: Accelerate (1.0 to 1.15, accelerator.py / utils/modeling.py get_grad_scaler) builds
        # `torch.mlu.amp.GradScaler` for mlu, which is the right class on every torch_mlu line:
        # on r1.22_pt2.1.0 a subclass of `torch.cuda.amp.GradScaler` (torch 2.1 has no
        # `torch.amp.GradScaler`), on pt2.3/2.4 `torch.amp.GradScaler("mlu")` by its old name,
        # deprecated from pt2.4 on (torch_mlu/mlu/amp/grad_scaler.py). So it is kept, and only
        # the deprecation warning is silenced; on CUDA it picks torch.cuda's scaler before 2.3.
        warnings.filterwarnings("ignore", message=r".*amp\.GradScaler.*deprecated")
        accelerator = Accelerator(
            cpu=device_type == "cpu",
            mixed_precision=mixed_precision,
            kwargs_handlers=handlers,
            **accelerator_kwargs,
        )
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
        causes = pitfalls(expected) or [_LAUNCH_MISMATCH]
        raise BackendError("; ".join(problems) + ". Likely cause: " + " | ".join(causes))
