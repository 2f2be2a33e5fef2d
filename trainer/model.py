"""create_model over timm: any timm architecture, weights only from a local file."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from trainer.config import ModelConfig


class ModelError(ValueError):
    """An unknown model name or an unusable weights file; the message names it."""


def create_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """Build `cfg.name` with `num_classes` outputs, optionally from a local weights file.

    The weights file is read through timm's `pretrained_cfg_overlay=dict(file=...)`, which
    loads safetensors, or torch files with `weights_only=True`, and adapts the
    classifier when its size differs; nothing is fetched from a hub.
    """
    if not timm.is_model(cfg.name):
        close = timm.list_models(f"*{cfg.name.split('.')[0][:8]}*")[:5]
        raise ModelError(f"model.name: unknown timm model '{cfg.name}'" + (f" (similar: {', '.join(close)})" if close else ""))
    kwargs = dict(num_classes=num_classes, drop_rate=cfg.drop_rate)
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if not cfg.pretrained_file:
        return timm.create_model(cfg.name, pretrained=False, **kwargs)
    path = Path(cfg.pretrained_file).expanduser()
    if not path.is_file():
        raise ModelError(f"model.pretrained_file: {path} does not exist")
    try:
        return timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        raise ModelError(f"model.pretrained_file: {path} does not fit {cfg.name}: {str(err).splitlines()[0]}") from None
