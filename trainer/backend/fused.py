"""Whether the device runs torch's fused optimizer kernels: listed by torch and really there."""

from __future__ import annotations

import warnings
from typing import Any

# The dispatch key a device type's kernels are registered under; plugins use PrivateUse1.
_DISPATCH_KEYS = {"cuda": "CUDA", "xpu": "XPU", "mps": "MPS", "cpu": "CPU", "hpu": "HPU", "mtia": "MTIA"}


def fused_devices() -> list[str]:
    """torch's list of device types its optimizers accept `fused=True` for ([] before it had one)."""
    from torch.utils import _foreach_utils

    listed = getattr(_foreach_utils, "_get_fused_kernels_supported_devices", None)
    return list(listed()) if listed else []


def has_own_kernel(op: str, device_type: str) -> bool:
    """Whether `op` has a kernel registered for the device itself (a backend fallback does not count)."""
    import torch

    key = _DISPATCH_KEYS.get(device_type, "PrivateUse1")
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, key))
    except RuntimeError:  # an op this torch does not have
        return False


def fused_sgd_status(device: Any) -> tuple[bool, str]:
    """(whether fused SGD runs on the device, why not or how it was established).

    NOTE: three conditions, each seen to fail alone. torch's optimizers check the device
    against `_get_fused_kernels_supported_devices()`, which torch_mlu limits to cuda and xpu
    (torch_mlu/utils/_foreach_utils.py on r1.22_pt2.4.0; a patch of torch on pt2.1/pt2.3), so
    `SGD(fused=True)` fails at its first step on an MLU. `aten::_fused_sgd_` has no MLU kernel
    (codegen/mlu_functions.yaml has only torch_mlu's own `fused_sgd`): the op runs on the CPU
    fallback (MLUFallback.cpp, with a warning), so a probe step alone would pass. Hence the
    list, then the kernel registration, then a one-element step that must not warn.
    """
    import torch

    device = torch.device(device)
    if not hasattr(torch, "_fused_sgd_"):
        return False, f"torch {torch.__version__} has no fused SGD"
    if device.type not in fused_devices():
        return False, f"torch's fused-optimizer device list ({', '.join(fused_devices())}) leaves out {device.type}"
    if not has_own_kernel("aten::_fused_sgd_", device.type):
        return False, f"aten::_fused_sgd_ has no {device.type} kernel (it would run on a CPU fallback)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to the CPU announces itself with a warning
            param = torch.zeros(1, device=device)
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
                found_inf=torch.zeros(1, device=device),
            )
    except (RuntimeError, NotImplementedError, AttributeError, TypeError, Warning) as err:
        return False, f"a fused SGD step failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return True, "listed by torch, with a device kernel"


def supports_fused_optimizer(device: Any) -> bool:
    """Whether this device runs torch's fused SGD kernel (`fused_sgd_status`).

    NOTE: with a loss scaler, only a fused optimizer skips an overflowing step on the
    device; any other makes GradScaler read the inf check back with `.item()`, a host
    sync every step.
    """
    return fused_sgd_status(device)[0]
