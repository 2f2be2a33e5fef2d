"""OptimizerStep: the one optimizer-step boundary, and the hooks that join it.

Each micro-batch runs `with boundary.accumulate(): ... boundary.backward(loss)`. Accelerate
decides whether the micro-batch closes an accumulation window (`sync_gradients`); only
then, in this order:

1. every hook's `before_update(step)`: the gradients are complete and not yet applied
   (gradient clipping goes here; use `accelerator.clip_grad_norm_`, which unscales fp16);
2. the optimizer step (Accelerate's wrapper skips it inside a window, and the loss
   scaler skips it on an overflow);
3. the scheduler step and the step counter `state.global_step`;
4. every hook's `after_update(step)`, with the new step count (EMA goes here, as timm's
   `model_ema.update(model, step=num_updates)`).

A feature that acts "after each update" joins as a hook and never re-derives when an
update happened. A hook is any object with one or both methods; one that also has
`state_dict()` and `load_state_dict(state)` is saved and restored with every checkpoint
(Accelerate's `register_for_checkpointing`), so it must be added before `Trainer.resume`
(that is, in `Trainer.__init__`), and in the same order on every run of one run directory:
a checkpoint saved without a stateful hook does not load with it (Accelerate looks for
its `custom_checkpoint_<i>.pkl`).

    class EmaHook(StepHook):
        def __init__(self, model): self.model, self.ema = model, timm.utils.ModelEmaV3(model)
        def after_update(self, step): self.ema.update(self.model, step=step)
        def state_dict(self): return self.ema.state_dict()
        def load_state_dict(self, state): self.ema.load_state_dict(state)

    trainer.boundary.add_hook(EmaHook(trainer.model))
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.checkpoint import TrainState


class StepHook:
    """A base for hooks (subclassing is optional: any object with either method joins)."""

    def before_update(self, step: int) -> None:
        """Gradients of the update that becomes `step` are complete and not yet applied."""

    def after_update(self, step: int) -> None:
        """The optimizer and scheduler have stepped; `step` is the new `global_step`."""


class OptimizerStep:
    """Owns the optimizer step, the scheduler step, the step counter and the hooks around them."""

    def __init__(
        self, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: TrainState
    ) -> None:
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.state = state
        self.hooks: list[Any] = []

    def add_hook(self, hook: Any) -> None:
        """Run `hook.before_update(step)` / `hook.after_update(step)` at every update.

        The hook's state is checkpointed if it has one (`state_dict` / `load_state_dict`).
        """
        if not (hasattr(hook, "before_update") or hasattr(hook, "after_update")):
            raise TypeError(f"{type(hook).__name__} has neither before_update nor after_update")
        if hasattr(hook, "state_dict") and hasattr(hook, "load_state_dict"):
            self.accelerator.register_for_checkpointing(hook)
        self.hooks.append(hook)

    def accumulate(self) -> Any:
        """The context for one micro-batch: gradients sync across processes only at a window's end."""
        return self.accelerator.accumulate(self.model)

    def backward(self, loss: torch.Tensor) -> bool:
        """Backpropagate one micro-batch's loss and, at a window's end, update; True when it updated."""
        self.accelerator.backward(loss)
        updating = self.accelerator.sync_gradients
        if updating:
            self._call("before_update", self.state.global_step + 1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if updating:
            self.scheduler.step()
            self.state.global_step += 1
            self._call("after_update", self.state.global_step)
        return updating

    @property
    def lr(self) -> float:
        """The learning rate the next update uses."""
        return max(self.scheduler.get_last_lr())  # the head's under optim.layer_decay, whose groups differ

    def _call(self, name: str, step: int) -> None:
        for hook in self.hooks:
            method = getattr(hook, name, None)
            if method is not None:
                method(step)
