"""NonFiniteGuard: stop after a run of non-finite losses, and never checkpoint NaNs.

The streak is counted on the device, so the loop does not wait for the host; it is read
only where the loop syncs anyway (log points, checkpoints, the epoch's end). With fp16's
loss scaler the scaler skips overflowing steps itself, and the guard only watches the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from trainer.errors import TrainingStopped

log = logging.getLogger("trainer")


class NonFiniteGuard:
    """Counts consecutive non-finite losses; `check` raises past `limit`, `safe_to_save` vetoes bad checkpoints."""

    def __init__(self, device: torch.device, limit: int, loss_scaler: bool, checkpoints: Path) -> None:
        self.limit, self.loss_scaler, self.checkpoints = limit, loss_scaler, checkpoints
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.worst = torch.zeros((), dtype=torch.int64, device=device)

    def observe(self, loss: torch.Tensor) -> None:
        """Count this loss: device work only, no sync."""
        finite = torch.isfinite(loss.detach())
        self.streak = (self.streak + 1) * (~finite)
        torch.maximum(self.worst, self.streak, out=self.worst)

    def check(self, step: int) -> None:
        """Raise `TrainingStopped` once `limit` consecutive losses were non-finite (reads the device)."""
        worst = int(self.worst.item())
        if not self.loss_scaler and worst >= self.limit:
            raise TrainingStopped(
                f"loss was non-finite for {worst} consecutive steps, up to step {step} (limit train.max_non_finite_steps={self.limit}); the last good checkpoint is kept in {self.checkpoints}"
            )

    def safe_to_save(self, model: torch.nn.Module, step: int) -> bool:
        """False (with a warning) when the latest loss or the weights are non-finite; every process agrees."""
        self.check(step)
        if not self.loss_scaler and int(self.streak.item()):
            log.warning("step %d: loss is non-finite; checkpoint not saved", step)
            return False
        # NOTE: an update can overflow weights while the loss it came from was finite; the
        # weights are the same on every process, so all of them skip the (collective) save.
        if not bool(torch.stack([torch.isfinite(p.detach()).all() for p in model.parameters()]).all()):
            log.warning("step %d: the weights hold non-finite values; checkpoint not saved", step)
            return False
        return True
