"""Failed collectives, reworded: which process, at which step, waiting for what.

A collective that times out or loses a peer raises deep inside the process group (gloo:
`RuntimeError: [...unbound_buffer.cc:78] Timed out waiting 300000ms for recv operation`,
or `Connection reset by peer`; NCCL/CNCL with async error handling: a `DistBackendError`).
`named_collective_failures` turns that into a `CollectiveError` whose one line names the
rank, the training step and the wait, read from where in the trainer the call was made.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Where in the trainer a collective is called (function names on the failing stack,
# innermost first), and what that call waits for.
WAITS = (
    ("epoch_over", "the stop agreement (every process asks whether to stop)"),
    ("agreed", "the stop agreement (every process asks whether to stop)"),
    ("_flags", "the non-finite check (every process's losses and weights)"),
    ("save", "the checkpoint barrier (every process saves its state)"),
    ("evaluate", "the validation all-reduce (every process's val sums, and whether it was asked to stop)"),
    ("train_step", "the gradient all-reduce (DDP backward)"),
    ("backward", "the gradient all-reduce (DDP backward)"),
    ("snapshot", "the epoch's metrics all-reduce"),
    ("train_epoch", "the epoch's metrics all-reduce"),
    ("export", "the barrier after exporting the weights"),
    ("prepare", "the run-directory check on the main process"),
    ("resume", "the checkpoint load"),
)
_TIMEOUT_WORDS = ("timed out", "timeout", "watchdog")
_PEER_WORDS = (
    "connection reset",
    "connection closed",
    "broken pipe",
    "connection refused",
    "peer",
    "socket",
    "remoteerror",
)


class CollectiveError(RuntimeError):
    """A collective timed out or lost a peer; the message names the process, step and wait."""


def is_collective_failure(err: BaseException) -> bool:
    """True for the errors a process group raises when a peer is slow, stuck or gone."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    from trainer.backend import PROCESS_GROUP_BACKENDS

    text = str(err).lower()
    words = (*set(PROCESS_GROUP_BACKENDS.values()), *_TIMEOUT_WORDS, *_PEER_WORDS)
    return isinstance(err, RuntimeError) and any(w in text for w in words)


def what_was_awaited(err: BaseException) -> str:
    """The trainer call that waited, from the innermost known function on the stack."""
    names = [frame.name for frame in traceback.extract_tb(err.__traceback__)]
    for name in reversed(names):
        for function, wait in WAITS:
            if name == function:
                return wait
    return f"a collective in {names[-1]}" if names else "a collective"


def describe(err: BaseException, rank: int, step: int, timeout_s: float) -> str:
    text = str(err).lower()
    wait = what_was_awaited(err)
    if "dataloader" in text:
        cause = (
            f"timed out after backend.collective_timeout_s={timeout_s:g} s "
            "waiting for a batch from the data loader's workers"
        )
    elif any(w in text for w in _TIMEOUT_WORDS):
        cause = (
            f"timed out after backend.collective_timeout_s={timeout_s:g} s "
            f"waiting in {wait}: another process is stuck or much slower"
        )
    elif any(w in text for w in _PEER_WORDS):
        cause = f"lost another process during {wait}: it exited or was killed (see its own log)"
    else:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        cause = f"failed in {wait}: {first}"
    return (
        f"process {rank}: step {step}: {cause}; checkpoints up to the "
        "last one are intact, resume with train.resume=auto"
    )


@contextlib.contextmanager
def named_collective_failures(rank: int, step: Callable[[], int], timeout_s: float) -> Iterator[None]:
    """Re-raise a failed collective inside the block as one `CollectiveError` line."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a collective's failure
        if not is_collective_failure(err):
            raise
        raise CollectiveError(describe(err, rank, step(), timeout_s)) from None


def max_over_processes(values: torch.Tensor) -> torch.Tensor:
    """`values` maxed element-wise over every process of the group (in place); unchanged for one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def exit_now(code: int) -> None:
    """Leave without interpreter teardown: after a failed collective, the process group's
    threads abort the process at exit ("terminate called without an active exception")."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
