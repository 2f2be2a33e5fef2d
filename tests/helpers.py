"""Tiny datasets built on the spot: an ImageNet-layout JPEG folder and HF parquet / save_to_disk dirs.

Every factory draws its images from `jpeg_bytes`, so the folder and the HF copies of a
dataset hold byte-identical files. Each class has its own colour (a model can learn
it) and each image its own bright square (so every file, and every crop, differs).
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Far apart in RGB so even a 16-pixel crop tells the classes apart.
PALETTE = [(220, 40, 40), (40, 180, 40), (40, 60, 220), (220, 200, 40), (200, 40, 200), (40, 200, 200)]


def class_names(classes: int) -> list[str]:
    """ImageNet-like wnid folder names, already in sorted order (so label i is names[i])."""
    return [f"n{i:08d}" for i in range(classes)]


def class_colour(label: int) -> tuple[int, int, int]:
    if label < len(PALETTE):
        return PALETTE[label]
    rng = np.random.default_rng(label)
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def make_image(label: int, index: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """Class colour with a horizontal brightness ramp, plus a square placed by `index`."""
    width, height = size
    base = np.array(class_colour(label), dtype=np.float32)
    ramp = np.linspace(0.6, 1.0, width, dtype=np.float32)[None, :, None]
    pixels = np.broadcast_to(base * ramp, (height, width, 3)).copy()
    side = max(2, min(width, height) // 4)
    x = (index * 7) % max(1, width - side)
    y = (index * 5) % max(1, height - side)
    pixels[y : y + side, x : x + side] = 255.0
    return Image.fromarray(pixels.astype(np.uint8))  # HxWx3 uint8: RGB


def jpeg_bytes(label: int, index: int, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    make_image(label, index, size).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def split_rows(classes: int, per_class: int, size: tuple[int, int], offset: int) -> list[tuple[int, str, bytes]]:
    """(label, file name, JPEG bytes), class by class; `offset` keeps train and val images distinct."""
    rows = []
    for label in range(classes):
        for i in range(per_class):
            index = offset + i
            rows.append((label, f"{index:04d}.JPEG", jpeg_bytes(label, index, size)))
    return rows


def make_image_folder(
    root: Path,
    classes: int = 3,
    train_per_class: int = 6,
    val_per_class: int = 3,
    size: tuple[int, int] = (40, 30),
    names: list[str] | None = None,
) -> Path:
    """Write `root/train/<class>/*.JPEG` and `root/val/<class>/*.JPEG`; return `root`.

    Args:
        names: Class folder names, one per class (label i -> names[i] in writing order);
            default `class_names(classes)`.
    """
    names = names or class_names(classes)
    assert len(names) == classes
    for split, per_class, offset in (("train", train_per_class, 0), ("val", val_per_class, 1000)):
        for label, file_name, data in split_rows(classes, per_class, size, offset):
            folder = root / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / file_name).write_bytes(data)
    return root


def _hf_split(rows: list[tuple[int, str, bytes]], names: list[str], image_column: str, label_column: str):
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            image_column: [{"bytes": data, "path": f"{names[label]}/{file_name}"} for label, file_name, data in rows],
            label_column: [label for label, _, _ in rows],
        }
    )
    ds = ds.cast_column(image_column, datasets.Image())
    return ds.cast_column(label_column, datasets.ClassLabel(names=names))


def make_hf_splits(
    classes: int = 3,
    train_per_class: int = 6,
    val_per_class: int = 3,
    size: tuple[int, int] = (40, 30),
    image_column: str = "image",
    label_column: str = "label",
    train_split: str = "train",
    val_split: str = "validation",
):
    """A `datasets.DatasetDict` with the same images, names and order as `make_image_folder`."""
    import datasets

    names = class_names(classes)
    return datasets.DatasetDict(
        {
            train_split: _hf_split(split_rows(classes, train_per_class, size, 0), names, image_column, label_column),
            val_split: _hf_split(split_rows(classes, val_per_class, size, 1000), names, image_column, label_column),
        }
    )


def make_hf_parquet(root: Path, **kwargs) -> Path:
    """Write the hub layout `root/data/<split>-00000-of-00001.parquet`; return `root`.

    Takes `make_hf_splits`'s arguments.
    """
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, ds in make_hf_splits(**kwargs).items():
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def make_hf_saved(root: Path, single_split: str | None = None, **kwargs) -> Path:
    """`save_to_disk` of the DatasetDict, or of one split alone as a plain Dataset; return `root`."""
    splits = make_hf_splits(**kwargs)
    (splits[single_split] if single_split else splits).save_to_disk(str(root))
    return root


def make_hf_hub_cache(cache_dir: Path, repo_id: str = "ILSVRC/imagenet-1k", **kwargs) -> Path:
    """Lay out `repo_id` in a datasets cache as an earlier online `load_dataset(repo_id)` leaves it.

    `<cache>/<namespace>___<name>/default/0.0.0/<hash>/<name>-<split>.arrow` plus its
    dataset_info.json is what `load_dataset(repo_id)` reads when the hub is offline.
    Takes `make_hf_splits`'s arguments; returns `cache_dir`.
    """
    import shutil

    from datasets.packaged_modules.parquet.parquet import Parquet

    namespace, name = repo_id.split("/")
    source = make_hf_parquet(cache_dir / "_source", **kwargs)
    files = {split.name.split("-")[0]: [str(split)] for split in sorted((source / "data").glob("*.parquet"))}
    builder = Parquet(cache_dir=str(cache_dir / "_build"), dataset_name=name, data_files=files, hash="0" * 16)
    builder.download_and_prepare()
    (config_dir,) = (cache_dir / "_build" / name).iterdir()  # default-<data files hash>
    target = cache_dir / f"{namespace}___{name}" / "default"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(config_dir), str(target))
    shutil.rmtree(cache_dir / "_build")
    shutil.rmtree(source)
    return cache_dir


REPO = Path(__file__).resolve().parent.parent


def two_process_launcher(*launch_args: str) -> list[str]:
    """`accelerate launch` of two CPU processes (configs/accelerate/cpu_2proc.yaml) on a free port, up to `-m`."""
    config = str(REPO / "configs/accelerate/cpu_2proc.yaml")
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config,
        "--main_process_port",
        str(free_port()),
        *launch_args,
        "-m",
    ]


def free_port() -> int:
    """A loopback port nobody listens on now, for an `accelerate launch` rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment has TRAINER_TEST_RUN=marker.

    torchrun starts its workers in sessions of their own, so a process-group kill would miss them.
    """
    needle = f"TRAINER_TEST_RUN={marker}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:  # gone already, or not ours to read
            continue


def create_datasets_for(cfg, num_classes: int = 0, train: bool = True):
    """`create_datasets` for one process (rank 0 of 1) from a loaded `Config`, seed 0."""
    from trainer.data.loader import create_datasets

    return create_datasets(
        **cfg.data_sections(),
        model_name=cfg.model.name,
        seed=0,
        rank=0,
        world_size=1,
        num_classes=num_classes,
        train=train,
    )


def create_pipeline_for(cfg, datasets, accelerator, pin_memory: bool, channels_last: bool, train: bool = True):
    """`create_pipeline` from a loaded `Config`'s loader, input and aug sections."""
    from trainer.data.pipeline import create_pipeline

    return create_pipeline(
        datasets,
        **cfg.pipeline_sections(),
        accelerator=accelerator,
        pin_kwargs={"pin_memory": pin_memory} if pin_memory else {},
        channels_last=channels_last,
        train=train,
    )
