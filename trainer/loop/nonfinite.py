"""NonFiniteGuard: stop after a run of non-finite losses, and never checkpoint NaNs.

The streak is counted on the device, so the loop does not wait for the host; it is read
only where the loop syncs anyway (log points, checkpoints, the epoch's end). With fp16's
loss scaler the scaler skips overflowing steps itself, and the guard only watches the weights.

Each process sees its own losses, so every decision is taken on figures maxed over all
processes (`agree`, one small all-reduce at points every process reaches together): a NaN
on one process stops or spares the checkpoint on all of them, never on that one alone,
which would leave the others waiting in the next collective until the timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from trainer.collectives import max_over_processes
from trainer.errors import TrainingStopped

log = logging.getLogger("trainer")


class NonFiniteGuard:
    """Counts consecutive non-finite losses; `check` raises past `limit`, `safe_to_save` vetoes bad checkpoints."""

    def __init__(
        self,
        device: torch.device,
        limit: int,
        loss_scaler: bool,
        checkpoints: Path,
        agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """`agree` maxes a tensor over all processes (by default the process group's all-reduce, when there is one)."""
        self.limit, self.loss_scaler, self.checkpoints = limit, loss_scaler, checkpoints
        self.agree = agree or max_over_processes
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.worst = torch.zeros((), dtype=torch.int64, device=device)

    def observe(self, loss: torch.Tensor) -> None:
        """Count this loss: device work only, no sync."""
        finite = torch.isfinite(loss.detach())
        self.streak = (self.streak + 1) * (~finite)
        torch.maximum(self.worst, self.streak, out=self.worst)

    def _flags(self, model: torch.nn.Module | None = None) -> tuple[int, bool, bool]:
        """(the longest streak on any process, any latest loss non-finite, any weight non-finite); one collective."""
        weights_bad = torch.zeros((), dtype=torch.int64, device=self.worst.device)
        if model is not None:
            weights_bad = (~torch.stack([torch.isfinite(p.detach()).all() for p in model.parameters()]).all()).to(
                torch.int64
            )
        # NOTE: reduced as float32, which every collective backend reduces (int64 is not a given)
        flags = torch.stack([self.worst, self.streak.clamp(max=1), weights_bad.to(self.worst.device)]).to(torch.float32)
        worst, streak, bad = self.agree(flags).tolist()
        return int(worst), bool(streak), bool(bad)

    def check(self, step: int) -> None:
        """Raise `TrainingStopped` once `limit` consecutive losses were non-finite on a process.

        Reads the device; a collective: every process calls it.
        """
        self._raise_past_limit(self._flags()[0], step)

    def _raise_past_limit(self, worst: int, step: int) -> None:
        if not self.loss_scaler and worst >= self.limit:
            raise TrainingStopped(
                f"loss was non-finite for {worst} consecutive steps, up to step "
                f"{step} (limit train.max_non_finite_steps={self.limit}); the "
                f"last good checkpoint is kept in {self.checkpoints}"
            )

    def safe_to_save(self, model: torch.nn.Module, step: int) -> bool:
        """False (with a warning) when a latest loss or the weights are non-finite on any process; collective."""
        worst, streak, weights_bad = self._flags(model)
        self._raise_past_limit(worst, step)
        if not self.loss_scaler and streak:
            log.warning("step %d: loss is non-finite; checkpoint not saved", step)
            return False
        # NOTE: an update can overflow weights while the loss it came from was finite
        if weights_bad:
            log.warning("step %d: the weights hold non-finite values; checkpoint not saved", step)
            return False
        return True
