"""BatchAugment: timm's random erasing and mixup/cutmix on the device batch, seeded per micro-batch."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trainer.batch_augment import create_batch_augment, seeded_rngs
from trainer.config import AugConfig, MixupConfig

CLASSES = 4


def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % CLASSES


def augment(mixup=None, aug=None, smoothing=0.1, seed=0):
    return create_batch_augment(
        mixup=mixup or MixupConfig(),
        aug=aug or AugConfig(),
        num_classes=CLASSES,
        label_smoothing=smoothing,
        seed=seed,
    )


def test_nothing_on_is_no_augment():
    assert augment() is None


def test_same_place_same_draws_whatever_came_before():
    aug = augment(MixupConfig(mixup_alpha=0.2, cutmix_alpha=1.0), AugConfig(re_prob=1.0))
    x, y = batch(8)
    a = aug(x.clone(), y, epoch=1, batch_index=5)
    random.random(), np.random.rand(), torch.rand(3)  # other consumers move the global generators
    b = aug(x.clone(), y, epoch=1, batch_index=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the next micro-batch: another process's, or the next accumulated one
    c = aug(x.clone(), y, epoch=1, batch_index=6)
    assert not torch.equal(a[0], c[0])
    d = augment(MixupConfig(mixup_alpha=0.2, cutmix_alpha=1.0), AugConfig(re_prob=1.0), seed=1)(
        x.clone(), y, epoch=1, batch_index=5
    )
    assert not torch.equal(a[0], d[0])


def test_the_callers_generators_are_left_as_they_were():
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state())
    with seeded_rngs(123):
        random.random(), np.random.rand(), torch.rand(1)
    assert (
        random.getstate() == state[0]
        and np.array_equal(np.random.get_state()[1], state[1])
        and torch.equal(torch.random.get_rng_state(), state[2])
    )


def test_mixup_targets_are_smoothed_probabilities_of_two_classes():
    aug = augment(MixupConfig(mixup_alpha=1.0))
    assert aug.soft_targets
    x, y = batch(6)
    images, targets = aug(x.clone(), y, 0, 0)
    assert targets.shape == (6, CLASSES) and torch.allclose(targets.sum(1), torch.ones(6))
    assert images.shape == x.shape and not torch.equal(images, x)


@pytest.mark.parametrize("n", [1, 3, 7])
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_an_odd_batch_mixes_all_but_its_last_image(n, mode):
    aug = augment(MixupConfig(mixup_alpha=1.0, cutmix_alpha=1.0, mode=mode))
    x, y = batch(n)
    images, targets = aug(x.clone(), y, 0, 0)
    assert images.shape == x.shape and targets.shape == (n, CLASSES)
    assert torch.equal(images[-1], x[-1])  # the odd one out is untouched
    off = 0.1 / CLASSES
    assert torch.allclose(targets[-1], torch.full((CLASSES,), off).index_fill(0, y[-1:], 1 - 0.1 + off))


def test_random_erasing_alone_keeps_index_targets():
    aug = augment(aug=AugConfig(re_prob=1.0, re_mode="const", re_count=2))
    assert not aug.soft_targets
    x, y = batch(4)
    images, targets = aug(x.clone(), y, 0, 0)
    assert targets is y
    assert all((images[i] == 0).any() for i in range(4))  # every image has an erased (zeroed) box
