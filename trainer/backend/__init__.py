"""The one seam to the device: device type, process group, precision and device helpers.

Everything that names a device type (`mlu`, `cuda`, ...), calls a `torch.<device>` module
or picks a collective backend lives in this package, so that the same config and the same
`accelerate launch` command run on Cambricon MLUs (torch_mlu + cncl), CUDA (nccl) and
CPU (gloo). Accelerate does the device placement; this package makes sure it chose what
the user asked for, and says why and how to fix it when it did not.

One module per concern:
    devices        device types, their plugins and collective backends; discovery
    precision      bf16 support, `train.precision` as Accelerate's mixed precision
    memory         device memory and host<->device traffic statistics
    fused          whether the device runs torch's fused optimizer kernels
    host_memory    pinned loader memory, glibc's keeping of freed memory
    plugin_lines   the torch line a plugin was built for, and the variables each line reads
    process_group  collective error handling, process groups after a restart
    device_rng     the device's own random generator, seeded per block
    state          `Backend`, the resolved picture the trainer holds
    accelerator    Accelerate's set-up and the checks that it agrees
    stack_checks   the device stack `trainer doctor` reports (line, versions, scaler, ...)
"""

from __future__ import annotations

from trainer.backend.accelerator import check_accelerator_state, create_accelerator, pitfalls
from trainer.backend.devices import (
    DEVICE_PLUGINS,
    DEVICE_TYPES,
    DISTRIBUTED_TYPES,
    HOST_DEVICE_TYPE,
    PROCESS_GROUP_BACKENDS,
    REFERENCE_DEFAULT_PROCESS_GROUP,
    VISIBLE_DEVICES_VARS,
    available_device_types,
    device_count,
    device_for_process_group,
    device_module,
    import_device_plugins,
    is_device_available,
    resolve_device_type,
    visible_devices,
)
from trainer.backend.host_memory import retain_freed_host_memory
from trainer.backend.precision import MIXED_PRECISION, is_bf16_supported, precision_name, resolve_precision
from trainer.backend.process_group import enable_collective_error_handling, init_restarted_process_group
from trainer.backend.stack_checks import device_stack_rows
from trainer.backend.state import Backend, DeviceTimer
from trainer.errors import BackendError

__all__ = [
    "DEVICE_PLUGINS",
    "DEVICE_TYPES",
    "DISTRIBUTED_TYPES",
    "HOST_DEVICE_TYPE",
    "MIXED_PRECISION",
    "PROCESS_GROUP_BACKENDS",
    "REFERENCE_DEFAULT_PROCESS_GROUP",
    "VISIBLE_DEVICES_VARS",
    "Backend",
    "BackendError",
    "DeviceTimer",
    "available_device_types",
    "check_accelerator_state",
    "create_accelerator",
    "device_count",
    "device_for_process_group",
    "device_module",
    "device_stack_rows",
    "enable_collective_error_handling",
    "import_device_plugins",
    "init_restarted_process_group",
    "is_bf16_supported",
    "is_device_available",
    "pitfalls",
    "precision_name",
    "resolve_device_type",
    "resolve_precision",
    "retain_freed_host_memory",
    "visible_devices",
]
