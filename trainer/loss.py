"""create_loss: the training criterion, cross-entropy or per-class BCE, for hard or mixed (soft) targets.

Validation always reports plain cross-entropy (`trainer.evaluate`), whatever trains.
"""

from __future__ import annotations

import torch
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy


def create_loss(name: str, label_smoothing: float, bce_target_threshold: float, soft_targets: bool) -> torch.nn.Module:
    """The criterion for `train.loss`, called as `criterion(logits, targets)`.

    Args:
        name: "ce" or "bce".
        label_smoothing: for hard targets; with `soft_targets` the mixer has already
            smoothed them, as timm's train.py does.
        bce_target_threshold: bce only: targets >= this become 1, the rest 0; 0 keeps them.
        soft_targets: targets arrive as (N, classes) probabilities (mixup/cutmix on), not indices.
    """
    if name == "bce":
        # NOTE: timm's BinaryCrossEntropy smooths only index targets; dense ones pass as they are.
        return BinaryCrossEntropy(
            smoothing=0.0 if soft_targets else label_smoothing, target_threshold=bce_target_threshold or None
        )
    if soft_targets:
        return SoftTargetCrossEntropy()
    return torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class indices for the train top-1: indices stay, soft targets give their largest class.

    NOTE: under mixup/cutmix the largest class is the image holding the larger share of
    the mix (lam >= 0.5), so train top-1 counts predictions of the dominant image.
    """
    return targets.argmax(dim=1) if targets.ndim == 2 else targets
