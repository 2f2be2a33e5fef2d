"""StopAgreement: SIGTERM/Ctrl-C and exhausted stream shards, agreed across processes.

A stop asked of one process must stop all of them at the same step, or the others wait
in their next collective for ever. Processes compare flags (one small all-reduce) at the
loop's log points, the same steps on all of them, and on the CPU at every step; after
each checkpoint save (a save waits for every process anyway); and between epochs. In
validation each process stops at its own next batch, and the validation all-reduce, which
every process reaches, carries the stop to the others (`trainer.evaluate`).

NOTE: reading the agreement waits for the device, so on an accelerator it happens only
where the loop already reads the loss, never between log points. On the CPU, which
computes synchronously, it costs no overlap, and agreeing every step means a Ctrl-C
(torchrun forwards SIGINT, then SIGKILLs after 30 s) is agreed within one step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger("trainer")


class StopAgreement:
    """`requested` once a signal arrived here or, after agreeing, on any process."""

    def __init__(self, accelerator: Any, every_step: bool = False) -> None:
        self.accelerator, self.every_step, self.requested = accelerator, every_step, False

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """While inside, SIGTERM and SIGINT request a stop instead of killing the process."""
        previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = True
        _received.append(signum)

    def asked_here(self) -> bool:
        """Whether this process was asked to stop, without asking the others (validation's per-batch check)."""
        return self.requested

    def agreed(self) -> bool:
        """True when any process was asked to stop; every process must call it at the same point."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self.requested
        flag = torch.tensor([int(self.requested)], device=acc.device)
        return self._agree(acc.reduce(flag, "sum").item() > 0)

    def adopt(self, stopped_anywhere: bool) -> bool:
        """Take on a stop that another collective already agreed (the validation all-reduce); returns it."""
        return self._agree(stopped_anywhere)

    def _agree(self, agreed: bool) -> bool:
        """The agreed answer, the same on every process, is what the caller acts on.

        NOTE: a signal handled here while the reduce ran sets `requested` too late for the
        others to see it: this process must still answer as they do (else it alone stops,
        and the others wait in their next collective), and keeps the request for the next
        agreement.
        """
        self.requested = self.requested or agreed
        return agreed

    def epoch_over(self, step: int, stream_ended: bool, at_log_point: bool) -> bool:
        """True once a stop was requested, or every process's stream shard has run out."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self.requested
        if not (at_log_point or self.every_step):
            return False
        flags = torch.tensor([int(self.requested), int(stream_ended)], device=acc.device)
        stops, ended = acc.reduce(flags, "sum").tolist()
        if ended == acc.num_processes:
            log.info("step %d: every process's stream shard has run out; the epoch ends here", step)
        return self._agree(stops > 0) or ended == acc.num_processes


# -- a test hook ---------------------------------------------------------------------------
HOLD_ENV = "TRAINER_TEST_HOLD"
HOLD_LIMIT_S = 60.0
_received: list[int] = []  # the stop signals this process has handled
_held: set[str] = set()


def hold_for_test(moment: str) -> None:
    """Tests only: with TRAINER_TEST_HOLD=<moment>, announce the moment once and wait there for a stop signal.

    So that a test can signal a run in a moment that lasts milliseconds (in validation,
    during a save, between epochs) instead of racing it; the wait ends on the signal, or
    after `HOLD_LIMIT_S`. Without the variable this is one dictionary lookup.
    """
    if os.environ.get(HOLD_ENV) != moment or moment in _held:
        return
    _held.add(moment)
    print(f"test hold: {moment}, pid {os.getpid()}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not _received and time.monotonic() < deadline:
        time.sleep(0.01)
