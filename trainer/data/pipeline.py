"""The input pipeline assembled: both loaders, placed on the device, and the on-device normalizer.

The batch contract between the transforms, the dataset and the device (named here once):
with `loader.normalize_on_device`, timm's transforms end in `MaybePILToTensor`, so workers
ship uint8 (N, 3, H, W) batches, 4x fewer bytes than float, and `Normalizer` turns them
into normalized float on the device; without it the transforms normalize on the host and
batches arrive as float, which `Normalizer` passes through (only the memory format is set).

With `input.train_size_schedule`, `resize` hands the train loop each epoch's loader: the same
one, or (when the scheduled size changes) a new one over the train set rebuilt at that size.

Every batch reaches the device one way, `place`: Accelerate's `prepare_data_loader`,
which shards a map-style loader across processes and copies batches to the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.data_loader import prepare_data_loader

from trainer.config import AugConfig, InputConfig, LoaderConfig
from trainer.data.loader import Datasets, create_loader, resize_train
from trainer.data.resize import TrainResize, train_size_at


class Normalizer:
    """uint8 batches -> normalized float on the device; channels_last for conv nets; float batches pass."""

    def __init__(self, mean: tuple, std: tuple, device: torch.device, channels_last: bool) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().sub_(self.mean).div_(self.std)
        return images.contiguous(memory_format=self.memory_format)


@dataclass
class InputPipeline:
    train: Any | None  # None when only evaluating; the first epoch's loader (`resize` gives the others)
    val: Any
    normalize: Normalizer
    resize: TrainResize | None = None  # (epoch, loader) -> that epoch's train loader, rebuilt when its size changes


def place(loader: Any, accelerator: Any, shard: bool, even_batches: bool = True) -> Any:
    """The loader with batches copied to the device, and (when `shard`) split across processes."""
    # NOTE: dispatch_batches=False: by default Accelerate has process 0 read an
    # IterableDataset and hand out slices of its batches, so the other processes'
    # stream shards would never be read.
    return prepare_data_loader(
        loader,
        accelerator.device,
        num_processes=accelerator.num_processes if shard else 1,
        process_index=accelerator.process_index if shard else 0,
        put_on_device=True,
        non_blocking=True,
        dispatch_batches=False,
        even_batches=even_batches,
    )


def create_pipeline(
    data: Datasets,
    *,
    loader: LoaderConfig,
    input: InputConfig,
    aug: AugConfig,
    accelerator: Any,
    pin_kwargs: dict,
    channels_last: bool,
    train: bool = True,
    wait_s: float = 0,
) -> InputPipeline:
    """Both loaders (or the val loader alone) on the device, and the normalizer for their batches.

    A streamed split is already sharded by process in its reader: it is only placed. A
    map-style train split is sharded by Accelerate; validation shards without padding
    (even_batches=False): each image is seen by exactly one process and per-process sums
    are reduced, so the metrics stay exact even when an undecodable image is skipped.
    `wait_s` > 0 bounds each wait for a batch from the loader workers.
    """
    shard = not data.streamed
    train_loader, resize = None, None
    if train:

        def create_train_loader() -> Any:
            batches = create_loader(
                data.train,
                loader,
                batch_size=loader.batch_size_per_device,
                pin_kwargs=pin_kwargs,
                sampler=data.train_sampler,
                drop_last=True,
                timeout_s=wait_s,
            )
            return place(batches, accelerator, shard)

        def rebuild(size: int) -> Any:
            resize_train(data, aug=aug, loader=loader, size=size)
            return create_train_loader()  # new workers, forked by the fork server, get the dataset at the new size

        train_loader = create_train_loader()
        schedule = input.train_size_schedule
        resize = TrainResize(schedule, train_size_at(schedule, 0, data.data_config["input_size"][-1]), rebuild)
    val_batch = loader.val_batch_size_per_device or loader.batch_size_per_device
    val_loader = create_loader(data.val, loader, batch_size=val_batch, pin_kwargs=pin_kwargs, timeout_s=wait_s)
    normalize = Normalizer(data.data_config["mean"], data.data_config["std"], accelerator.device, channels_last)
    return InputPipeline(train_loader, place(val_loader, accelerator, shard, even_batches=False), normalize, resize)
