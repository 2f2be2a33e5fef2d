"""BatchAugment: random erasing and mixup/cutmix on the normalized device batch (timm's components).

timm applies both after the loader (erasing in its prefetcher, then `Mixup`), so does this.
Both draw from the global `random`, numpy and torch generators; each micro-batch seeds
them from (seed, epoch, micro-batch index) and puts the caller's states back, so a run
resumed mid-epoch draws exactly what the uninterrupted run drew, whatever else consumed
random numbers before (loader start-up, a resumed process's set-up). The index is the
micro-batch's place in the epoch's global order (`trainer.data.sampler`), not a count of
this process's batches: each process draws differently, and a micro-batch draws the same
on 1, 2 or 3 processes, so a run resumed on another process count augments as before.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing

from trainer.backend.device_rng import seeded_device_rng
from trainer.config import AugConfig, MixupConfig
from trainer.data.dataset import sample_seed


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed random, numpy and torch (CPU) with `seed` inside the block; restore them after."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        random.seed(seed)
        np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
        torch.random.default_generator.manual_seed(seed)
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)


class BatchAugment:
    """`(images, labels) -> (images, targets)`: erase, then mix; targets are (N, classes) when mixing."""

    def __init__(
        self,
        *,
        mixup: MixupConfig,
        aug: AugConfig,
        num_classes: int,
        label_smoothing: float,
        seed: int,
    ) -> None:
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.seed = seed * 1_000_003
        self.mix = None
        if mixup.mixup_alpha > 0 or mixup.cutmix_alpha > 0:
            self.mix = Mixup(
                mixup_alpha=mixup.mixup_alpha,
                cutmix_alpha=mixup.cutmix_alpha,
                prob=mixup.prob,
                switch_prob=mixup.switch_prob,
                mode=mixup.mode,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        self.erase = None
        if aug.re_prob > 0:
            self.erase = RandomErasing(probability=aug.re_prob, mode=aug.re_mode, max_count=aug.re_count, device="meta")

    @property
    def soft_targets(self) -> bool:
        return self.mix is not None

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: int, batch_index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seed = sample_seed(self.seed, epoch, batch_index)
        with seeded_rngs(seed), seeded_device_rng(images.device, seed):
            if self.erase is not None:
                self.erase.device = images.device  # NOTE: its noise is drawn where the batch is
                images = self.erase(images)
            if self.mix is None:
                return images, labels
            return self._mix(images, labels)

    def _mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's Mixup needs an even batch: with an odd one (an image skipped), the last image stays unmixed."""
        n = labels.numel()
        even = n - n % 2
        if even == n:
            return self.mix(images, labels)
        alone = mixup_target(labels[even:], self.num_classes, 1.0, self.label_smoothing)
        if even == 0:
            return images, alone
        mixed, targets = self.mix(images[:even], labels[:even])
        return torch.cat([mixed, images[even:]]), torch.cat([targets, alone])


def create_batch_augment(
    *,
    mixup: MixupConfig,
    aug: AugConfig,
    num_classes: int,
    label_smoothing: float,
    seed: int,
) -> BatchAugment | None:
    """A BatchAugment when mixup, cutmix or random erasing is on; None otherwise."""
    if mixup.mixup_alpha <= 0 and mixup.cutmix_alpha <= 0 and aug.re_prob <= 0:
        return None
    return BatchAugment(mixup=mixup, aug=aug, num_classes=num_classes, label_smoothing=label_smoothing, seed=seed)
