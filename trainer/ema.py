"""WeightsEma: an exponential moving average of the weights (timm ModelEmaV3), kept on the model's device.

It joins the optimizer-step boundary (`after_step`, called once per optimizer step with
the step count) and never re-derives when an update happened. Its state is the averaged
weights alone: the warmup decay is a function of the update count, itself
`global_step // every_steps`, so a resumed run needs only the weights back (saved as
`model_ema.safetensors` in each checkpoint, the same file `trainer eval --ema` reads).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.utils import ModelEmaV3

from trainer.config import EmaConfig

EMA_WEIGHTS = "model_ema.safetensors"


class WeightsEma:
    """The EMA of one model's weights and buffers."""

    def __init__(self, model: torch.nn.Module, cfg: EmaConfig) -> None:
        self.cfg = cfg
        # NOTE: built from the unwrapped model after `prepare`, so it already sits on the
        # device; float32 EMA keeps fp16/bf16 updates from rounding to nothing.
        self.ema = ModelEmaV3(model, decay=cfg.decay, use_warmup=cfg.warmup, warmup_power=cfg.warmup_power)
        self.ema.requires_grad_(False)

    @property
    def module(self) -> torch.nn.Module:
        return self.ema.module

    def after_step(self, model: torch.nn.Module, global_step: int) -> None:
        """Average `model` in after optimizer step `global_step` (1-based), every `every_steps` steps."""
        if global_step % self.cfg.every_steps:
            return
        self.ema.update(model, step=global_step // self.cfg.every_steps)

    def reset_to(self, model: torch.nn.Module) -> None:
        """Copy `model`'s weights in (an EMA turned on at resume starts from the resumed weights)."""
        self.ema.set(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    def load(self, checkpoint_dir: Path) -> bool:
        """Restore from a checkpoint's model_ema.safetensors; False when it has none."""
        path = checkpoint_dir / EMA_WEIGHTS
        if not path.is_file():
            return False
        self.load_state_dict(load_file(str(path)))  # copied onto the EMA's device
        return True


class EmaStepHook:
    """Joins the optimizer-step boundary: averages `model` into `ema` after each update.

    NOTE: no `state_dict` here on purpose, so the boundary does not register it with
    Accelerate: the EMA's weights travel as model_ema.safetensors inside each checkpoint
    (`CheckpointManager.save(extra_weights=...)`), which lets a run switch the EMA on at a
    resume (it then starts from the resumed weights) instead of failing to load.
    """

    def __init__(self, ema: WeightsEma, model: torch.nn.Module) -> None:
        self.ema, self.model = ema, model

    def after_update(self, step: int) -> None:
        self.ema.after_step(self.model, step)


def create_ema(cfg: EmaConfig, model: torch.nn.Module) -> WeightsEma | None:
    """A WeightsEma of the (unwrapped, placed) model when `ema.enabled`, else None."""
    return WeightsEma(model, cfg) if cfg.enabled else None
