"""create_optimizer and create_lr_scheduler: the recipe's SGD + step decay, or cosine with warmup."""

from __future__ import annotations

import inspect
import math
from functools import partial

import timm.optim
import torch
from timm.optim import create_optimizer_v2

from trainer.config import OptimConfig, ScheduleConfig
from trainer.errors import ConfigError

# NOTE: timm before 1.0.12 (timm/optim/optim_factory.py) builds 'sgd' as
# `optim.SGD(..., nesterov=True, **opt_args)` and 'momentum' with nesterov=False, so a
# `nesterov` keyword is given twice (TypeError). Its optimizer registry (1.0.12,
# timm/optim/_optim_factory.py) makes nesterov a default that a keyword overrides.
_TIMM_TAKES_NESTEROV = hasattr(timm.optim, "OptimizerRegistry")
# torch 2.1's SGD has no fused kernel (no `fused` parameter); later lines have one.
_SGD_TAKES_FUSED = "fused" in inspect.signature(torch.optim.SGD).parameters
_SGD_NAMES = ("sgd", "momentum", "nesterov")


def create_optimizer(model: torch.nn.Module, cfg: OptimConfig, prefer_fused: bool = False) -> torch.optim.Optimizer:
    """timm's optimizer factory (sgd, momentum, adamw, lamb, lars, ...).

    Like the reference script, weight decay applies to all parameters unless
    `optim.no_decay_norm_bias`, which puts norm weights and biases (every 1-d parameter)
    in a group without decay, as timm's `filter_bias_and_bn` does. `optim.layer_decay`
    gives each block its own group, lr scaled by layer_decay per block below the head
    (timm's `param_groups_layer_decay`, which also takes 1-d parameters out of decay).

    Args:
        prefer_fused: take the fused SGD kernel when `cfg.implementation` is auto (the
            caller knows the device runs it; with a loss scaler it avoids a sync per step).
    """
    kwargs = {}
    name = cfg.name
    if name in ("sgd", "momentum") and not _TIMM_TAKES_NESTEROV:  # the older timm's names for each
        name, kwargs = ("sgd" if cfg.nesterov else "momentum"), dict(momentum=cfg.momentum)
    elif name in ("sgd", "momentum", "lars", "larc"):
        kwargs = dict(momentum=cfg.momentum, nesterov=cfg.nesterov)
    elif cfg.name in ("nesterov", "nlars", "nlarc"):  # Nesterov by name: optim.nesterov must not turn it off
        kwargs = dict(momentum=cfg.momentum)
    if cfg.implementation in ("foreach", "loop"):
        kwargs["foreach"] = cfg.implementation == "foreach"
    elif cfg.implementation == "fused":
        if cfg.name in _SGD_NAMES and not _SGD_TAKES_FUSED:
            why = f"torch {torch.__version__} has no fused SGD; use auto, foreach or loop"
            raise ConfigError(f"optim.implementation=fused: {why}")
        kwargs["fused"] = True
    elif cfg.implementation == "auto" and prefer_fused and cfg.name in _SGD_NAMES and _SGD_TAKES_FUSED:
        kwargs["fused"] = True
    no_decay_1d = cfg.no_decay_norm_bias
    if cfg.layer_decay:
        # NOTE: timm 1.0.3's param_groups_layer_decay takes 1-d parameters out of decay always,
        # later ones only with filter_bias_and_bn (timm/optim/_optim_factory.py,
        # weight_decay_exclude_1d): asking for it gives one behaviour on every admitted timm.
        kwargs["layer_decay"], no_decay_1d = cfg.layer_decay, True
    kwargs.update(lr=cfg.lr, weight_decay=cfg.weight_decay, filter_bias_and_bn=no_decay_1d)
    optimizer = create_optimizer_v2(model, opt=name, **kwargs)
    # NOTE: timm's layer decay only tags each group with an `lr_scale`; timm's own schedulers
    # multiply it in (timm/scheduler/scheduler.py, `if 'lr_scale' in param_group`), a
    # LambdaLR does not, so the scale goes into the group's lr, the base LambdaLR scales.
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
    return optimizer


def zero_fused_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give fused SGD zeroed momentum buffers before its first step (call after the params sit on their device).

    NOTE: torch's fused SGD allocates its momentum buffers with `empty_like` and fills
    them in the first step it takes; when the loss scaler skips that step (fp16's first
    steps overflow), the next step reads uninitialized memory (seen: NaN weights on one of
    two processes, the others finite). With zeros, the first step's buffer is
    `momentum * 0 + grad = grad`, the same update (dampening is 0 here).
    """
    for group in optimizer.param_groups:
        if not (group.get("fused") and group.get("momentum", 0)):
            continue
        for param in group["params"]:
            state = optimizer.state[param]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(param)


def lr_factor(step: int, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int) -> float:
    """The lr multiplier at optimizer step `step`, a pure function so resume needs no state.

    1. warmup: linear from warmup_lr_ratio to 1 over warmup_epochs;
    2. step: gamma ** (epoch // step_epochs), the reference recipe's StepLR per epoch;
    3. cosine: from 1 to min_lr_ratio over the epochs after warmup.
    """
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return cfg.warmup_lr_ratio + (1 - cfg.warmup_lr_ratio) * step / warmup_steps
    if cfg.name == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_epochs)
    if cfg.name == "cosine":
        total = max(epochs * steps_per_epoch - warmup_steps, 1)
        progress = min((step - warmup_steps) / total, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def create_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimizer-step LambdaLR over `lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, cfg=cfg, steps_per_epoch=max(steps_per_epoch, 1), epochs=epochs)
    )


def move_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put the schedule at optimizer step `step`: the next update uses the lr of `step`.

    For a run resumed with another global batch: its schedule counts this run's steps per
    epoch, so the checkpoint's step count is translated to the same point of the run (in
    epochs) before training goes on. The optimizer's lr is set too: it was restored with
    the optimizer state, at the checkpoint's schedule.
    """
    scheduler.last_epoch = step
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # NOTE: what get_last_lr() returns (torch/optim/lr_scheduler.py)
