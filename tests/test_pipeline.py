"""Tests for trainer.data.pipeline: both loaders on the device, the uint8 contract and the Normalizer."""

from __future__ import annotations

import pytest
import torch

import helpers
from trainer.backend import create_accelerator
from trainer.config import Config, DataConfig, InputConfig, LoaderConfig, ModelConfig
from trainer.data.pipeline import Normalizer


def pipeline(image_folder, train: bool = True, **loader):
    cfg = Config(
        model=ModelConfig(name="test_resnet"),
        data=DataConfig(root=str(image_folder)),
        loader=LoaderConfig(batch_size_per_device=4, workers=0, **loader),
        input=InputConfig(img_size=16),
    )
    acc, backend = create_accelerator("cpu", "fp32")
    datasets = helpers.create_datasets_for(cfg, train=train)
    pin = bool(backend.pin_memory_kwargs(cfg.loader.pin_memory).get("pin_memory"))
    return datasets, helpers.create_pipeline_for(cfg, datasets, acc, pin_memory=pin, channels_last=True, train=train)


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
