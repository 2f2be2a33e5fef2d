"""Tests for trainer.data.pipeline: both loaders on the device, the uint8 contract and the Normalizer."""

from __future__ import annotations

import pytest
import torch

from trainer.backend import create_accelerator
from trainer.config import DataConfig
from trainer.data.loader import create_datasets
from trainer.data.pipeline import Normalizer, create_pipeline


def pipeline(image_folder, train: bool = True, **data):
    cfg = DataConfig(root=str(image_folder), img_size=16, batch_size_per_device=4, workers=0, **data)
    acc, backend = create_accelerator("cpu", "fp32")
    datasets = create_datasets(cfg, "test_resnet", seed=0, rank=0, world_size=1, train=train)
    return datasets, create_pipeline(datasets, cfg, acc, backend.pin_memory_kwargs(cfg.pin_memory), channels_last=True, train=train)


def test_uint8_batches_reach_the_device_and_are_normalized_there(image_folder):
    datasets, p = pipeline(image_folder)
    assert not datasets.streamed and datasets.num_classes(0) == 3
    batch = next(iter(p.train))
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (4, 3, 16, 16)
    images = p.normalize(batch["images"])
    assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
    assert len(p.train) == 18 // 4  # drop_last: full batches only
    assert sum(len(b["labels"]) for b in p.val) == 9  # every val image, the last batch short


def test_host_normalized_batches_pass_the_normalizer(image_folder):
    _, p = pipeline(image_folder, normalize_on_device=False)
    images = next(iter(p.val))["images"]
    assert images.dtype == torch.float32
    assert torch.equal(p.normalize(images), images)


def test_val_alone_builds_no_train_loader(image_folder):
    datasets, p = pipeline(image_folder, train=False)
    assert p.train is None and datasets.train is None and datasets.classes == sorted(datasets.classes)
    assert datasets.val_size == 9 and len(datasets.classes) == 3


def test_normalizer_matches_the_float_formula():
    norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"), channels_last=False)
    images = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    assert norm(images)[0, 0, 0].tolist() == pytest.approx([-2.0, 2.0])
