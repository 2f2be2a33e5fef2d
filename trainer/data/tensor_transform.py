"""timm's uint8 transforms, run on uint8 tensors: the same random draws, faster kernels.

With `normalize_on_device`, timm's pipeline ends in `MaybePILToTensor`: what leaves the
worker is uint8. Its steps (random resized crop, flips, resize, center crop) then have a
uint8 tensor twin in torchvision's v2 functional API, whose CPU resize runs a vectorized
uint8 kernel on (H, W, C) memory, about 2x faster than PIL's resize and within one grey
level of it (two for bicubic; same filters, antialiased; checked in tests). `tensor_plan` maps a timm
`Compose` to those twins, or returns None so that the caller keeps PIL.

The twins draw their random numbers exactly as the originals do (`random` for crop
geometry and a random interpolation, `torch.rand(1)` for flips), so per-sample seeding
and bit-identical resume hold on this path as on the PIL one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial

import torch
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

TensorStep = Callable[[torch.Tensor], torch.Tensor]
# Filters whose torch uint8 antialiased kernels match PIL's; nearest picks other pixels.
_MATCHING_FILTERS = frozenset({InterpolationMode.BILINEAR, InterpolationMode.BICUBIC})


def tensor_plan(transform: Callable) -> list[TensorStep] | None:
    """The tensor twins of `transform`'s steps, or None where any step has none.

    Only an exact `T.Compose` ending in `MaybePILToTensor` (uint8 output) qualifies:
    a float output (`ToTensor` + `Normalize`), colour jitter, auto-augment or an unknown
    step keeps the PIL pipeline.
    """
    steps = getattr(transform, "transforms", None)
    if type(transform) is not T.Compose or not steps or type(steps[-1]) is not MaybePILToTensor:
        return None
    plan = [_twin(step) for step in steps[:-1]]
    return None if any(twin is None for twin in plan) else plan


def run_plan(plan: list[TensorStep], image: torch.Tensor) -> torch.Tensor:
    """Apply the twins to a (3, H, W) uint8 tensor (best: a permuted (H, W, 3) array)."""
    for step in plan:
        image = step(image)
    return image


def _twin(step: object) -> TensorStep | None:
    # NOTE: partials of module functions, not closures: the plan travels to spawned workers.
    kind = type(step)
    if kind is RandomResizedCropAndInterpolation:
        modes = step.interpolation if isinstance(step.interpolation, (tuple, list)) else (step.interpolation,)
        return partial(_random_resized_crop, step) if _MATCHING_FILTERS.issuperset(modes) else None
    if kind in (T.RandomHorizontalFlip, T.RandomVerticalFlip):
        return partial(_random_flip, step.p, F.horizontal_flip if kind is T.RandomHorizontalFlip else F.vertical_flip)
    if kind is T.Resize and step.interpolation in _MATCHING_FILTERS and step.antialias is not False:
        size = [step.size] if isinstance(step.size, int) else list(step.size)
        return partial(F.resize, size=size, interpolation=step.interpolation, max_size=step.max_size, antialias=True)
    if kind is T.CenterCrop:
        return partial(F.center_crop, output_size=list(step.size))
    return None


def _random_resized_crop(step: RandomResizedCropAndInterpolation, image: torch.Tensor) -> torch.Tensor:
    # NOTE: the same draws in the same order as timm's __call__: geometry, then filter.
    top, left, height, width = step.get_params(image, step.scale, step.ratio)
    mode = random.choice(step.interpolation) if isinstance(step.interpolation, (tuple, list)) else step.interpolation
    return F.resized_crop(image, top, left, height, width, list(step.size), mode, antialias=True)


def _random_flip(p: float, flip: TensorStep, image: torch.Tensor) -> torch.Tensor:
    return flip(image) if torch.rand(1) < p else image
