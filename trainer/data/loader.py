"""create_datasets and create_loader: readers + timm transforms + DataLoader settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader

from trainer.config import ConfigError, DataConfig
from trainer.data.dataset import EpochSampler, ImageDataset, StreamingImageDataset, _SampleDecoder, collate
from trainer.data.digits import write_digits
from trainer.data.readers import DataError, HFStreamReader, SpreadSubset, create_reader
from trainer.data.sampler import RepeatAugSampler

BUILTIN_DATASETS = {"digits": write_digits}


@dataclass
class Datasets:
    train: Any
    val: Any
    classes: list[str]
    train_sampler: EpochSampler | RepeatAugSampler | None  # None when streaming
    data_config: dict  # timm's resolved input_size, interpolation, mean, std, crop_pct
    train_size: int  # samples per epoch (all processes)
    val_size: int


def resolve_input_config(cfg: DataConfig, model_name: str) -> dict:
    """timm's data config for the model, with the config's explicit values on top."""
    import timm.models

    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    args: dict[str, Any] = {}
    if cfg.img_size:
        args["input_size"] = (3, cfg.img_size, cfg.img_size)
    if cfg.crop_pct:
        args["crop_pct"] = cfg.crop_pct
    if cfg.interpolation:
        args["interpolation"] = cfg.interpolation
    if cfg.mean:
        args["mean"] = tuple(cfg.mean)
    if cfg.std:
        args["std"] = tuple(cfg.std)
    return resolve_data_config(args, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})


TRIVIAL_AUGMENT = ("trivial", "ta_wide")  # torchvision's TrivialAugmentWide; timm has none


def create_transforms(cfg: DataConfig, input_cfg: dict) -> tuple[Any, Any]:
    """Train and val transforms from timm; uint8 output when normalizing on the device.

    Random erasing is not here: it runs on the normalized device batch (`trainer.batch_augment`),
    where timm's prefetcher runs it. `data.test_img_size` sets the val crop apart from the train one.
    """
    common = dict(interpolation=input_cfg["interpolation"], mean=input_cfg["mean"], std=input_cfg["std"], use_prefetcher=cfg.normalize_on_device)
    trivial = cfg.auto_augment in TRIVIAL_AUGMENT
    try:
        train = create_transform(
            input_size=input_cfg["input_size"], is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
            color_jitter=cfg.color_jitter or None, auto_augment=None if trivial else cfg.auto_augment or None, **common,
        )
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        raise ConfigError(f"data.auto_augment: {cfg.auto_augment!r} is not a timm policy (rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0, original) nor trivial ({err})") from None
    if trivial:
        from torchvision import transforms as T

        steps = list(train.transforms)
        at = max((i + 1 for i, t in enumerate(steps) if isinstance(t, (T.RandomHorizontalFlip, T.RandomVerticalFlip))), default=1)
        steps.insert(at, T.TrivialAugmentWide(interpolation=T.InterpolationMode.BILINEAR))
        train = T.Compose(steps)
    test_size = (3, cfg.test_img_size, cfg.test_img_size) if cfg.test_img_size else input_cfg["input_size"]
    val = create_transform(input_size=test_size, is_training=False, crop_pct=input_cfg["crop_pct"], crop_mode=input_cfg.get("crop_mode", "center"), **common)
    return train, val


def create_datasets(cfg: DataConfig, model_name: str, seed: int, rank: int, world_size: int, num_classes: int = 0) -> Datasets:
    """Both splits of the configured source, decoded and transformed by one pipeline.

    Raises:
        DataError: for a missing root or split, or val classes absent from train; the
            message names the path and the expected layout.
    """
    if cfg.create_if_missing and not Path(cfg.root).expanduser().exists():
        BUILTIN_DATASETS[cfg.create_if_missing](Path(cfg.root).expanduser())
    input_cfg = resolve_input_config(cfg, model_name)
    train_tf, val_tf = create_transforms(cfg, input_cfg)
    size = input_cfg["input_size"][-1]
    test_size = cfg.test_img_size or size
    val_split = cfg.val_split or ("val" if cfg.source == "folder" else "validation")
    draft = cfg.draft_decode

    if cfg.streaming:
        if cfg.source != "hf":
            raise DataError("data.streaming: only the hf source streams; a folder is read directly")
        if cfg.repeated_aug > 1:
            raise ConfigError(f"data.repeated_aug: {cfg.repeated_aug} needs an indexed source; a stream cannot repeat its images (set data.streaming=false)")
        train_reader = HFStreamReader(cfg, cfg.train_split, rank, world_size, seed, shuffle=True, num_classes=num_classes)
        classes = train_reader.classes
        val_reader = HFStreamReader(cfg, val_split, rank, world_size, seed, shuffle=False, classes=classes)
        decoder = _SampleDecoder(train_tf, num_classes or len(classes), size if draft else None, cfg.on_error, seed)
        val_decoder = _SampleDecoder(val_tf, num_classes or len(classes), int(test_size / input_cfg["crop_pct"]) if draft else None, cfg.on_error, seed)
        sizes = [_split_size(train_reader), _split_size(val_reader)]
        return Datasets(StreamingImageDataset(train_reader, decoder), StreamingImageDataset(val_reader, val_decoder), classes, None, input_cfg, *sizes)

    train_reader = SpreadSubset.of(create_reader(cfg, cfg.train_split), cfg.max_train_samples)
    classes = train_reader.classes
    val_reader = SpreadSubset.of(create_reader(cfg, val_split, classes=classes), cfg.max_val_samples)
    decoder = _SampleDecoder(train_tf, num_classes or len(classes), size if draft else None, cfg.on_error, seed)
    val_decoder = _SampleDecoder(val_tf, num_classes or len(classes), int(test_size / input_cfg["crop_pct"]) if draft else None, cfg.on_error, seed)
    sampler: EpochSampler | RepeatAugSampler = EpochSampler(len(train_reader), shuffle=True, seed=seed)
    if cfg.repeated_aug > 1:
        sampler = RepeatAugSampler(len(train_reader), cfg.repeated_aug, seed, world_size, cfg.batch_size_per_device)
    return Datasets(
        ImageDataset(train_reader, decoder), ImageDataset(val_reader, val_decoder), classes, sampler,
        input_cfg, len(train_reader), len(val_reader),
    )


def _split_size(reader: HFStreamReader) -> int:
    info = getattr(reader._ds, "info", None)
    splits = getattr(info, "splits", None) or {}
    split = splits.get(reader.split) if hasattr(splits, "get") else None
    return int(split.num_examples) if split is not None and split.num_examples else 0


def create_loader(dataset: Any, cfg: DataConfig, batch_size: int, pin_kwargs: dict, sampler: Any = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader with the configured workers, prefetch and pinning."""
    workers = cfg.workers
    kwargs: dict[str, Any] = dict(num_workers=workers, collate_fn=collate, drop_last=drop_last, **pin_kwargs)
    if workers > 0:
        kwargs.update(prefetch_factor=cfg.prefetch_factor, persistent_workers=cfg.persistent_workers)
    if sampler is None and not isinstance(dataset, torch.utils.data.IterableDataset):
        sampler = EpochSampler(len(dataset), shuffle=False, seed=0)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
