"""GradClip: gradient clipping by norm, a `before_update` hook of the optimizer-step boundary.

It runs when an update's gradients are complete (after the last micro-batch of an
accumulation window) and before the optimizer applies them. Accelerate's
`clip_grad_norm_` unscales fp16 gradients first, so the norm compared with `max_norm` is
the true one. The norms before clipping are summed on the device and read only where the
loop already reads (log points, the epoch's end): no host sync per step.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.metrics import RunningSums


class GradClip:
    """Clip the gradient norm to `max_norm` at every update; `mean_norm()` is this epoch's mean before clipping."""

    def __init__(self, accelerator: Any, model: torch.nn.Module, max_norm: float) -> None:
        self.accelerator, self.model, self.max_norm = accelerator, model, max_norm
        self.norms = RunningSums(accelerator.device, ("norm", "steps"))

    def before_update(self, step: int) -> None:
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.norms.add(norm, torch.ones((), device=norm.device))

    def mean_norm(self) -> float:
        """The mean norm over this epoch's updates so far (the same on every process); reads the device."""
        totals = self.norms.totals()
        return totals["norm"] / max(totals["steps"], 1)

    def reset(self) -> None:
        """A new epoch."""
        self.norms.reset()
