"""Process groups: collective error handling, and groups formed again after a restart."""

from __future__ import annotations

import os

from trainer.backend.devices import PROCESS_GROUP_BACKENDS

# NOTE: with async error handling a collective past its timeout aborts the communicator and
# ends the process instead of waiting for ever; torch_mlu mirrors NCCL's variable (MLU_NOTES).
ASYNC_ERROR_HANDLING_VARS = {"mlu": "TORCH_CNCL_ASYNC_ERROR_HANDLING", "cuda": "TORCH_NCCL_ASYNC_ERROR_HANDLING"}


def enable_collective_error_handling(device_type: str) -> None:
    """Switch on async error handling for the device's collectives, unless set already."""
    if device_type in ASYNC_ERROR_HANDLING_VARS:
        os.environ.setdefault(ASYNC_ERROR_HANDLING_VARS[device_type], "1")


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
