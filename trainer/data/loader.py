"""create_datasets and create_loader: readers + timm transforms + DataLoader settings."""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import MaybePILToTensor, ToNumpy
from torch.utils.data import DataLoader

from trainer.config import AugConfig, ConfigError, DataConfig, InputConfig, LoaderConfig
from trainer.data.dataset import EpochSampler, ImageDataset, StreamingImageDataset, _SampleDecoder, collate
from trainer.data.digits import write_digits
from trainer.data.readers import SpreadSubset
from trainer.data.resize import train_size_at
from trainer.data.sampler import EpochOrderSampler
from trainer.data.sources import class_names, create_reader, create_stream_reader, get_source
from trainer.data.worker_memory import bound_worker_heap
from trainer.data.worker_signals import SERVER_INIT, detach_worker, kill_workers_at_exit

BUILTIN_DATASETS = {"digits": write_digits}


def effective_num_classes(configured: int, classes: list[str]) -> int:
    """The classifier's outputs: `model.num_classes`, or (when 0) the number of classes in the data."""
    return configured or len(classes)


@dataclass
class Datasets:
    train: Any  # None when only evaluating
    val: Any
    classes: list[str]
    train_sampler: EpochOrderSampler | None  # None when streamed (or only evaluating)
    data_config: dict  # timm's resolved input_size, interpolation, mean, std, crop_pct
    train_size: int  # training samples (all processes); 0 when unknown
    val_size: int
    streamed: bool = False  # the readers stream and shard by process themselves

    def num_classes(self, configured: int) -> int:
        """`effective_num_classes` of this data."""
        return effective_num_classes(configured, self.classes)

    def check_val_size(self, num_processes: int, *, config_file: str, root: str) -> None:
        """Every process needs at least one val image: fewer would leave one without a batch."""
        if self.val_size and self.val_size < num_processes:
            raise ConfigError(
                f"{config_file}: {num_processes} processes but only "
                f"{self.val_size} validation images in {root}; launch fewer "
                "processes"
            )


def resolve_input_config(cfg: InputConfig, model_name: str) -> dict:
    """timm's data config for the model, with the `input` section's explicit values on top."""
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


def create_train_transform(aug: AugConfig, input_cfg: dict, size: int, normalize_on_device: bool) -> Any:
    """The train transform from timm at `size` px (a scheduled size, or the input size); uint8 output
    when normalizing on the device.

    Random erasing is not here: it runs on the normalized device batch (`trainer.batch_augment`),
    where timm's prefetcher runs it.
    """
    trivial = aug.auto_augment in TRIVIAL_AUGMENT
    try:
        train = create_transform(
            input_size=(3, size, size),
            is_training=True,
            scale=tuple(aug.scale),
            ratio=tuple(aug.ratio),
            hflip=aug.hflip,
            color_jitter=aug.color_jitter or None,
            auto_augment=None if trivial else aug.auto_augment or None,
            **_common_transform_args(input_cfg, normalize_on_device),
        )
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        raise ConfigError(
            f"aug.auto_augment: {aug.auto_augment!r} is not a timm policy "
            "(rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0, original) nor "
            f"trivial ({err})"
        ) from None
    train = _uint8_tensor_output(train)
    if trivial:
        from torchvision import transforms as T

        steps = list(train.transforms)
        at = max(
            (i + 1 for i, t in enumerate(steps) if isinstance(t, (T.RandomHorizontalFlip, T.RandomVerticalFlip))),
            default=1,
        )
        steps.insert(at, T.TrivialAugmentWide(interpolation=T.InterpolationMode.BILINEAR))
        train = T.Compose(steps)
    return train


def _common_transform_args(input_cfg: dict, normalize_on_device: bool) -> dict:
    return dict(
        interpolation=input_cfg["interpolation"],
        mean=input_cfg["mean"],
        std=input_cfg["std"],
        use_prefetcher=normalize_on_device,
    )


def create_val_transform(input_cfg: dict, test_img_size: int, normalize_on_device: bool) -> Any:
    """The val transform from timm: resize to size / crop_pct, center crop `test_img_size` (0: the input size)."""
    test_size = (3, test_img_size, test_img_size) if test_img_size else input_cfg["input_size"]
    val = create_transform(
        input_size=test_size,
        is_training=False,
        crop_pct=input_cfg["crop_pct"],
        crop_mode=input_cfg.get("crop_mode", "center"),
        **_common_transform_args(input_cfg, normalize_on_device),
    )
    return _uint8_tensor_output(val)


def create_transforms(
    *, aug: AugConfig, input_cfg: dict, test_img_size: int, normalize_on_device: bool, train_size: int = 0
) -> tuple[Any, Any]:
    """Train and val transforms from timm; `train_size` (0: the input size) sets the train crop.

    `input.test_img_size` sets the val crop apart from the train one.
    """
    train = create_train_transform(aug, input_cfg, train_size or input_cfg["input_size"][-1], normalize_on_device)
    return train, create_val_transform(input_cfg, test_img_size, normalize_on_device)


def _uint8_tensor_output(transform: Any) -> Any:
    """A timm pipeline that ends in a uint8 (C, H, W) tensor where timm's ends in the same as an array.

    NOTE: timm before 1.0.16 ends its `use_prefetcher` pipelines in `ToNumpy`, later ones in
    `MaybePILToTensor` (timm/data/transforms_factory.py); both give (C, H, W) uint8.
    """
    steps = getattr(transform, "transforms", None)
    if steps and type(steps[-1]) is ToNumpy:
        steps[-1] = MaybePILToTensor()
    return transform


def resize_train(data: Datasets, *, aug: AugConfig, loader: LoaderConfig, size: int) -> None:
    """Rebuild the train split's transform (and JPEG draft size) at `size` px; val is untouched.

    The dataset object stays: the sampler, reader and Accelerate's sharding refer to it.
    Workers that already hold a pickled copy do not see this (`trainer.data.resize`).
    """
    old = data.train.decoder
    transform = create_train_transform(aug, data.data_config, size, loader.normalize_on_device)
    draft_size = size if loader.draft_decode else None
    data.train.decoder = _SampleDecoder(transform, old.num_classes, draft_size, old.on_error, old.seed)


def create_datasets(
    *,
    data: DataConfig,
    loader: LoaderConfig,
    input: InputConfig,
    aug: AugConfig,
    model_name: str,
    seed: int,
    rank: int,
    world_size: int,
    num_classes: int = 0,
    train: bool = True,
) -> Datasets:
    """Both splits of the configured source (or, with `train=False`, val alone), decoded and
    transformed by one pipeline.

    Raises:
        DataError: for a missing root or split, or val classes absent from train; the
            message names the path and the expected layout.
    """
    start_worker_server(loader.workers)
    if data.create_if_missing and not Path(data.root).expanduser().exists():
        BUILTIN_DATASETS[data.create_if_missing](Path(data.root).expanduser())
    source = get_source(data.source)
    input_cfg = resolve_input_config(input, model_name)
    test_size = input.test_img_size or input_cfg["input_size"][-1]
    # a resumed run resizes on its first epoch
    size = train_size_at(input.train_size_schedule, 0, input_cfg["input_size"][-1])
    train_tf, val_tf = create_transforms(
        aug=aug,
        input_cfg=input_cfg,
        test_img_size=input.test_img_size,
        normalize_on_device=loader.normalize_on_device,
        train_size=size,
    )
    val_split = source.val_split(data)

    def decoder(transform: Any, draft_size: int, classes: list[str]) -> _SampleDecoder:
        num_outputs = effective_num_classes(num_classes, classes)
        return _SampleDecoder(transform, num_outputs, draft_size if loader.draft_decode else None, data.on_error, seed)

    if data.streaming:
        if aug.repeated_aug > 1:
            raise ConfigError(
                f"aug.repeated_aug: {aug.repeated_aug} needs an indexed source; a "
                "stream cannot repeat its images (set data.streaming=false)"
            )
        train_reader = create_stream_reader(
            data, data.train_split, rank, world_size, seed, shuffle=True, num_classes=num_classes
        )
        classes = train_reader.classes
        val_reader = create_stream_reader(data, val_split, rank, world_size, seed, shuffle=False, classes=classes)
        train_ds = StreamingImageDataset(train_reader, decoder(train_tf, size, classes)) if train else None
        val_ds = StreamingImageDataset(val_reader, decoder(val_tf, int(test_size / input_cfg["crop_pct"]), classes))
        return Datasets(
            train_ds, val_ds, classes, None, input_cfg, train_reader.num_samples, val_reader.num_samples, streamed=True
        )

    classes = None if train else class_names(data)
    train_reader = (
        SpreadSubset.of(create_reader(data, data.train_split, rank=rank), data.max_train_samples)
        if train or classes is None
        else None
    )
    classes = classes or train_reader.classes
    val_reader = SpreadSubset.of(create_reader(data, val_split, classes=classes, rank=rank), data.max_val_samples)
    val_ds = ImageDataset(val_reader, decoder(val_tf, int(test_size / input_cfg["crop_pct"]), classes))
    if not train:
        return Datasets(None, val_ds, classes, None, input_cfg, 0, len(val_reader))
    # NOTE: the epoch's unit is the global batch when it is fixed, so that the epoch has
    # the same samples on every process count (trainer.data.sampler)
    epoch_unit = loader.global_batch_size or loader.batch_size_per_device * world_size
    sampler = EpochOrderSampler(
        len(train_reader),
        seed=seed,
        epoch_unit=epoch_unit,
        batch_size=loader.batch_size_per_device,
        repeats=aug.repeated_aug,
    )
    return Datasets(
        ImageDataset(train_reader, decoder(train_tf, size, classes)),
        val_ds,
        classes,
        sampler,
        input_cfg,
        len(train_reader),
        len(val_reader),
    )


# Modules the fork server imports once, so that each worker it forks starts with them;
# the first makes the server and its workers ignore SIGINT/SIGTERM.
WORKER_PRELOAD = [SERVER_INIT, "trainer.data.dataset", "timm.data"]


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of loader workers: a fork server, never a fork of this process.

    NOTE: by the time a loader starts its workers, this process runs other threads: the
    process group's (gloo/NCCL/CNCL), the pin-memory thread, tqdm's monitor, the other
    loader's machinery. `fork` copies only the calling thread, so a lock another thread
    held at that moment stays locked in the child for ever (seen: a validation worker
    stuck inside `os.fork` in `PyThreadState` cleanup, and the other process waiting in
    its all-reduce). Starting the workers before any thread exists cannot be kept up
    (Accelerate forms the process group before the loaders exist, and a later feature
    would break it silently), so workers are forked instead by a fork server: a fresh,
    single-threaded process that imports `WORKER_PRELOAD` once and then forks a worker
    per request. The dataset reaches each worker pickled, which is why readers and
    transforms hold no closures or open handles. Cost: the server's start and the
    pickling, paid once per loader with persistent workers (benchmarks/README.md).

    The server and its workers ignore SIGINT and SIGTERM: the training process decides
    when to stop and shuts the workers down (`trainer.data.worker_signals`).
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    kill_workers_at_exit()
    return context


def start_worker_server(workers: int) -> None:
    """Start the workers' fork server now, so its imports overlap the model's set-up."""
    if workers > 0:
        worker_context()
        multiprocessing.forkserver.ensure_running()


def init_worker(worker_id: int) -> None:
    """`worker_init_fn` of the loaders: stop signals left to the trainer (`worker_signals`), a flat heap."""
    detach_worker()
    bound_worker_heap(worker_id)


def create_loader(
    dataset: Any,
    cfg: LoaderConfig,
    *,
    batch_size: int,
    pin_kwargs: dict,
    sampler: Any = None,
    drop_last: bool = False,
    timeout_s: float = 0,
) -> DataLoader:
    """A DataLoader with the configured workers, prefetch and pinning; workers via `worker_context`.

    `timeout_s` > 0 bounds the wait for one batch from the workers (a stuck worker).
    """
    workers = cfg.workers
    kwargs: dict[str, Any] = dict(num_workers=workers, collate_fn=collate, drop_last=drop_last, **pin_kwargs)
    if workers > 0:
        kwargs.update(
            prefetch_factor=cfg.prefetch_factor,
            persistent_workers=cfg.persistent_workers,
            multiprocessing_context=worker_context(),
            timeout=timeout_s,
            worker_init_fn=init_worker,
        )
    if sampler is None and not isinstance(dataset, torch.utils.data.IterableDataset):
        sampler = EpochSampler(len(dataset), shuffle=False, seed=0)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
