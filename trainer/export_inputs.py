"""The batch an export is checked on: the run's val split, given images, or random inputs, always said which.

Real images go through the training pipeline's own pieces: the source's reader, the
`_SampleDecoder` (decode + val transform, uint8 out) and the `Normalizer` the trainer
normalizes with on the device, here on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.backend import HOST_DEVICE_TYPE
from trainer.checkpoint import STATE_FILE
from trainer.errors import ConfigError, DataError

log = logging.getLogger("trainer")

RUN_CONFIG, MODEL_CONFIG = "config.yaml", "config.json"
USE_IMAGES = "pass --images to use real ones"


@dataclass
class CheckBatch:
    images: torch.Tensor  # normalized float (N, 3, H, W), the exported model's input
    labels: torch.Tensor | None  # the images' classes, where known
    described: str  # what the images are, for the report


def run_directory(path: Path) -> Path | None:
    """The run that made the model at `path` (a run, one of its checkpoints, or its model/ folder), if any."""
    candidates = [path]
    if (path / STATE_FILE).is_file():
        candidates.append(path.parent.parent)  # RUN/checkpoints/step_N
    if (path / MODEL_CONFIG).is_file():
        candidates.append(path.parent)  # RUN/model, RUN/model_ema
    return next((c for c in candidates if (c / RUN_CONFIG).is_file()), None)


def check_batch(model_path: str, input_cfg: dict, *, images: list[str], samples: int) -> CheckBatch:
    """Up to `samples` inputs: `images` when given, else the run's val split, else random (with a warning)."""
    if images:
        return _given_images(images, input_cfg, samples)
    run = run_directory(Path(model_path).expanduser())
    if run is not None:
        try:
            return _val_split(run, input_cfg, samples)
        except (DataError, ConfigError, OSError) as err:
            log.warning("the run's val split cannot be read (%s): checking on random inputs; %s", err, USE_IMAGES)
    else:
        log.warning("%s names no run, so no val split: checking on random inputs; %s", model_path, USE_IMAGES)
    size = tuple(int(v) for v in input_cfg["input_size"])
    generator = torch.Generator().manual_seed(0)
    return CheckBatch(torch.randn(samples, *size, generator=generator), None, "random normal inputs (no real images)")


def _val_split(run: Path, input_cfg: dict, samples: int) -> CheckBatch:
    """The first `samples` images of the run's val split (spread over it), as its val loader gives them."""
    from trainer.config import load_config
    from trainer.data.loader import create_datasets

    cfg = load_config(run / RUN_CONFIG)
    cfg.loader.workers, cfg.data.max_val_samples = 0, samples
    sections = dict(data=cfg.data, loader=cfg.loader, input=cfg.input, aug=cfg.aug, model_name=cfg.model.name)
    data = create_datasets(**sections, seed=cfg.train.seed, rank=0, world_size=1, train=False)
    items = []
    for item in data.val if data.streamed else (data.val[i] for i in range(len(data.val))):
        items.append(item)
        if len(items) == samples:
            break
    batch = _collate(items, input_cfg, f"the val split of {cfg.data.root}")
    described = f"val images of the run's data ({cfg.data.source} {cfg.data.root})"
    return CheckBatch(batch["images"], batch["labels"], described)


def _given_images(paths: list[str], input_cfg: dict, samples: int) -> CheckBatch:
    """Image files, folders or globs (as `trainer predict` takes them), decoded and transformed as the val split is."""
    from trainer.data.dataset import _SampleDecoder
    from trainer.data.loader import create_val_transform
    from trainer.predict import ImageFiles, expand_images

    files, missing = expand_images(paths)
    if missing:
        raise DataError(f"--images: {missing[0][0]}: {missing[0][1]}")
    transform = create_val_transform(input_cfg, 0, normalize_on_device=True)  # uint8 out, normalized below
    draft_size = int(input_cfg["input_size"][-1] / input_cfg["crop_pct"])  # as the val split decodes JPEGs
    reader = ImageFiles(files[:samples])
    decoder = _SampleDecoder(transform, len(reader), draft_size, "skip", seed=0)
    items = [decoder(reader.read(i), 0, i) for i in range(len(reader))]
    batch = _collate(items, input_cfg, f"--images ({len(files)} files)")
    return CheckBatch(batch["images"], None, f"given images ({len(files)} found, {len(batch['skipped'])} undecodable)")


def _collate(items: list[Any], input_cfg: dict, source: str) -> dict[str, Any]:
    """The loader's collate, then the trainer's normalization, on the CPU; skipped images named in the log."""
    from trainer.data.dataset import collate
    from trainer.data.pipeline import Normalizer

    batch = collate(items)
    for line in batch["skipped"]:
        log.warning("skipped %s", line.replace("\t", ": "))
    if batch["images"].numel() == 0:
        raise DataError(f"{source}: no decodable image to check the export on")
    normalize = Normalizer(input_cfg["mean"], input_cfg["std"], torch.device(HOST_DEVICE_TYPE), channels_last=False)
    batch["images"] = normalize(batch["images"])
    return batch
