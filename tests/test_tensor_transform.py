"""Tests for trainer.data.tensor_transform: which transforms run on tensors, and that they match PIL."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from trainer.data.tensor_transform import run_plan, tensor_plan


def photo(size: tuple[int, int] = (200, 150)) -> Image.Image:
    """Smooth colour field with edges and noise: resize filters differ most on such content."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(base, dtype=np.float32) + rng.normal(0, 12, (size[1], size[0], 3))
    pixels[40:90, 50:120] = (250, 20, 20)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def train(**kwargs):
    """timm's training transform as the trainer builds it (no colour jitter unless asked)."""
    kwargs = {
        "input_size": (3, 64, 64),
        "is_training": True,
        "use_prefetcher": True,
        "hflip": 0.5,
        "color_jitter": None,
        **kwargs,
    }
    return create_transform(**kwargs)


def val(**kwargs):
    kwargs = {"input_size": (3, 64, 64), "is_training": False, "crop_pct": 0.875, "use_prefetcher": True, **kwargs}
    return create_transform(**kwargs)


def seeded(fn, image, seed):
    random.seed(seed)
    torch.manual_seed(seed)
    return fn(image)


@pytest.mark.parametrize(
    "transform",
    [
        train(interpolation="bilinear"),
        train(interpolation="bicubic"),
        train(interpolation="random", vflip=0.5),
        val(interpolation="bilinear"),
        val(interpolation="bicubic"),
    ],
    ids=["train-bilinear", "train-bicubic", "train-random-filter", "val-bilinear", "val-bicubic"],
)
def test_tensor_twins_match_pil_up_to_rounding(transform) -> None:
    image = photo()
    plan = tensor_plan(transform)
    assert plan is not None
    tensor_in = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    for seed in range(12):  # crops, filters and flips drawn from the same seeds on both paths
        expected = seeded(transform, image, seed)
        actual = seeded(lambda x: run_plan(plan, x), tensor_in, seed)
        assert actual.dtype == torch.uint8 and actual.shape == expected.shape == (3, 64, 64)
        diff = (actual.int() - expected.int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.3, (seed, diff.max(), diff.float().mean())


def test_twins_draw_the_same_random_numbers_as_the_originals() -> None:
    transform = train(interpolation="random")
    tensor_in = torch.from_numpy(np.array(photo())).permute(2, 0, 1)
    seeded(transform, photo(), 3)
    after_pil = (random.random(), torch.rand(1).item())
    seeded(lambda x: run_plan(tensor_plan(transform), x), tensor_in, 3)
    assert (random.random(), torch.rand(1).item()) == after_pil


@pytest.mark.parametrize(
    "transform",
    [
        train(use_prefetcher=False),  # float output: ToTensor + Normalize stay on PIL
        train(color_jitter=0.4),
        train(auto_augment="rand-m9-mstd0.5"),
        train(interpolation="nearest"),  # torch's nearest picks other pixels than PIL's
        val(use_prefetcher=False),
    ],
    ids=["float-output", "color-jitter", "rand-augment", "nearest", "val-float"],
)
def test_transforms_without_exact_twins_keep_pil(transform) -> None:
    assert tensor_plan(transform) is None


def test_non_compose_transform_keeps_pil() -> None:
    assert tensor_plan(lambda image: image) is None


def test_plan_pickles_for_spawned_loader_workers() -> None:
    plan = tensor_plan(train(interpolation="random", vflip=0.5))
    copy = pickle.loads(pickle.dumps(plan))
    tensor_in = torch.from_numpy(np.array(photo())).permute(2, 0, 1)
    assert torch.equal(
        seeded(lambda x: run_plan(copy, x), tensor_in, 5), seeded(lambda x: run_plan(plan, x), tensor_in, 5)
    )


def test_spawned_loader_workers_give_the_same_batches(tmp_path) -> None:
    """The start method of macOS and of Python 3.14's default (forkserver) pickles the dataset."""
    from torch.utils.data import DataLoader

    import helpers
    from trainer.data.dataset import EpochSampler, ImageDataset, _SampleDecoder, collate
    from trainer.data.readers import FolderReader

    reader = FolderReader(helpers.make_image_folder(tmp_path / "data", classes=2, train_per_class=4) / "train")
    dataset = ImageDataset(reader, _SampleDecoder(train(input_size=(3, 16, 16)), 2, None, "raise", 0))
    assert dataset.decoder.plan is not None

    def batches(**kwargs):
        loader = DataLoader(
            dataset, batch_size=4, sampler=EpochSampler(len(dataset), True, 0), collate_fn=collate, **kwargs
        )
        return [batch["images"] for batch in loader]

    spawned = batches(num_workers=1, multiprocessing_context="spawn")
    assert all(torch.equal(a, b) for a, b in zip(batches(), spawned, strict=True))
