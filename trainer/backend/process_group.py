"""Process groups: collective error handling, and groups formed again after a restart."""

from __future__ import annotations

import os

from trainer.backend.devices import PROCESS_GROUP_BACKENDS
from trainer.backend.plugin_lines import error_variables, other_spellings


def enable_collective_error_handling(device_type: str) -> dict[str, str]:
    """Set the collective error-handling variables the device's torch line reads.

    NOTE: with async error handling a collective that fails or passes its timeout is
    caught by the process group's watchdog thread, which logs and ends the whole process
    (SIGABRT) instead of letting it hang; the trainer's own one-line message never runs.
    With blocking wait the error is raised in the calling thread instead, where the
    trainer turns it into one line (`collectives.named_collective_failures`). Both default
    to off in torch_mlu, so async handling is switched on unless set. A value the user gave
    under another line's name (TORCH_CNCL_BLOCKING_WAIT on the 2.1 line, which reads only
    CNCL_BLOCKING_WAIT) is carried over to the name this line reads.

    Returns:
        The variables this line reads, with the values now in force.
    """
    names = error_variables(device_type)
    for kind, name in names.items():
        given = [os.environ[other] for other in other_spellings(device_type, kind) if other in os.environ]
        if name not in os.environ and given:
            os.environ[name] = given[0]
    if "async" in names:
        os.environ.setdefault(names["async"], "1")
    return {name: os.environ.get(name, "") for name in names.values()}


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
