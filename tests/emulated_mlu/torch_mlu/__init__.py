"""An emulated Cambricon MLU for tests on machines without one.

Importing this package does what the real ``torch_mlu`` plugin does to a
stock torch, with host memory standing in for device memory:

* renames PyTorch's PrivateUse1 backend to ``mlu`` and loads a small C++
  library (built once, then cached) with the allocator, device guard, core
  kernels, autocast registrations and a CPU fallback for every other op;
* registers ``torch.mlu`` (:mod:`torch_mlu.mlu`) as the device module and
  generates ``Tensor.mlu()``, ``Tensor.is_mlu``, ``Module.mlu()``, ...;
* registers the ``cncl`` collective backend for ``mlu`` devices.

Put the directory holding this package on ``PYTHONPATH`` of the processes
that should see MLUs; ``EMULATED_MLU_DEVICE_COUNT`` (default 2) sets how
many. See ``tests/emulated_mlu/README.md``.
"""

from __future__ import annotations

import atexit
import os
import time

import torch
import torch.distributed as dist

from torch_mlu import _extension
from torch_mlu._line import LINE, VERSION

# NOTE: torch_mlu's own version names its torch line ("1.22.2-torch2.1.0"); `trainer doctor`
# compares it with the installed torch.
__version__ = VERSION
EMULATED_LINE = LINE
__all__ = ["mlu"]


def _register() -> None:
    from torch_mlu import _cncl
    from torch_mlu import mlu as device_module

    ops = _extension.load()
    ops.set_device_count(device_module.visible_device_count())
    torch.utils.rename_privateuse1_backend("mlu")
    torch._register_device_module("mlu", device_module)
    import inspect

    # NOTE: torch 2.1's generator has no for_packed_sequence argument.
    wanted = {"for_tensor": True, "for_module": True, "for_packed_sequence": True, "for_storage": True}
    accepted = inspect.signature(torch.utils.generate_methods_for_privateuse1_backend).parameters
    torch.utils.generate_methods_for_privateuse1_backend(**{k: v for k, v in wanted.items() if k in accepted})
    if dist.is_available():
        dist.Backend.register_backend("cncl", _cncl.create_process_group, devices=["mlu"])
    if os.environ.get("EMULATED_MLU_FUSED_KERNELS") == "1":
        _give_mlu_fused_sgd()
    else:
        _leave_mlu_out_of_foreach_and_fused_lists()


_libraries: list = []  # torch.library registrations live as long as their Library object


def _give_mlu_fused_sgd() -> None:
    """A device with torch's fused SGD (``EMULATED_MLU_FUSED_KERNELS=1``), as CUDA has it.

    Not a torch_mlu line: a test double for the trainer's paths on devices whose fused
    kernels exist (a loss-scaled step without a host sync). The kernel is registered for
    the device itself, so it is no fallback, and runs on host aliases uncounted.
    """
    if not hasattr(torch, "_fused_sgd_"):
        return
    library = torch.library.Library("aten", "IMPL")
    _libraries.append(library)

    def fused_sgd(*args: object, **kwargs: object) -> None:
        ops = torch.ops.emulated_mlu
        ops.begin_internal()
        try:
            on_host = [[t.cpu() for t in a] if isinstance(a, (list, tuple)) else a for a in args]
            host_kwargs = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            torch._fused_sgd_(*on_host, **host_kwargs)
            for device_list, host_list in zip(args[:3], on_host[:3]):
                for dst, src in zip(device_list, host_list):
                    dst.copy_(src)
        finally:
            ops.end_internal()

    for overload in ("_fused_sgd_", "_fused_sgd_.tensor_lr"):
        try:
            library.impl(overload, fused_sgd, "PrivateUse1")
        except RuntimeError:  # an overload this torch does not have
            pass


def _cuda_and_xpu() -> list[str]:
    return ["cuda", "xpu"]


def _leave_mlu_out_of_foreach_and_fused_lists() -> None:
    """torch's foreach and fused optimizer paths, as torch_mlu leaves them: cuda and xpu only.

    NOTE: torch_mlu/utils/_foreach_utils.py (r1.22_pt2.4.0) swaps the code of
    ``torch.utils._foreach_utils._get_foreach_kernels_supported_devices`` and
    ``_get_fused_kernels_supported_devices`` for ``return ["cuda", "xpu"]``; the pt2.1 and
    pt2.3 lines patch torch's source to the same lists (pytorch_patches/support_mlu_amp.diff).
    Swapping the code reaches the optimizers that imported the functions by name.
    """
    from torch.utils import _foreach_utils

    for name in ("_get_foreach_kernels_supported_devices", "_get_fused_kernels_supported_devices"):
        function = getattr(_foreach_utils, name, None)
        if function is not None:
            function.__code__ = _cuda_and_xpu.__code__


def _let_autograd_threads_settle() -> None:
    """Give autograd's device threads the GIL once before the interpreter exits.

    A backward on a non-CPU device runs on a per-device autograd thread that
    drops its last reference to the finished graph task, whose saved
    thread-local state holds a Python object, just after waking the caller. If
    the caller exits first, that thread takes the GIL during finalisation and
    the process dies with "terminate called without an active exception"
    (seen in about one run in fifteen when a script ends right after
    ``backward()``). Sleeping releases the GIL so the thread can finish.
    """
    time.sleep(0.02)


_register()
atexit.register(_let_autograd_threads_settle)

from torch_mlu import mlu  # noqa: E402  (torch.mlu, after registration)
