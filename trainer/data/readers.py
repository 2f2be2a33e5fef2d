"""Readers of raw samples behind one small interface: an ImageNet folder or HF `datasets`.

A reader hands out `Sample`s (raw bytes, label, name) and the class names. It never
decodes: `ImageDataset` decodes and transforms, so every source shares one pipeline.
Readers take explicit arguments; `trainer.data.sources` maps `data.*` onto them.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from trainer.data.folder_index import FOLDER_LAYOUT, IMG_EXTENSIONS, folder_index
from trainer.errors import DataError

__all__ = ["FOLDER_LAYOUT", "IMG_EXTENSIONS"]  # the folder layout's names, where readers are imported from
HF_LAYOUT = "a hub id in the local HF cache, a save_to_disk dir, or a dir of data/<split>-*.parquet shards"


@dataclass(frozen=True)
class Sample:
    data: bytes | None  # None when the source row has no image
    label: int
    name: str  # file path or "split[row]", for error messages and skipped.txt


@runtime_checkable
class Reader(Protocol):
    """Random-access source: `len()` samples, each read by index."""

    classes: list[str]

    def __len__(self) -> int: ...

    def read(self, index: int) -> Sample: ...


@runtime_checkable
class StreamReader(Protocol):
    """Sequential source for data that does not fit on local disk."""

    classes: list[str]

    def iter_samples(self, epoch: int) -> Iterator[Sample]: ...


class PathListReader:
    """Image files under `root`, by relative path (a numpy bytes array) with a label each: what the
    folder readers share.

    NOTE: numpy arrays, not lists of str: 1.28 M paths pickle to loader workers in one
    buffer, and a memory-mapped index is shared by every process through the page cache.
    """

    root: Path
    _paths: np.ndarray
    _labels: np.ndarray

    def __len__(self) -> int:
        return len(self._paths)

    def read(self, index: int) -> Sample:
        path = self.root / self._paths[index].decode()
        with open(path, "rb") as f:
            return Sample(f.read(), int(self._labels[index]), str(path))


class FolderReader(PathListReader):
    """`root/<class>/<file>` with classes indexed by sorted folder name, like torchvision's ImageFolder."""

    def __init__(
        self,
        split_dir: Path,
        classes: list[str] | None = None,
        allow_empty_classes: bool = False,
        index_cache: str = "off",
        rank: int = 0,
        index_wait_s: float = 600.0,
    ) -> None:
        """Index `split_dir` (once per job, see `folder_index`); an empty class folder is an
        error unless `allow_empty_classes` (check-data lists them all), in which case it is
        recorded in `empty_classes`."""
        index = folder_index(split_dir, index_cache, rank, index_wait_s)
        found, counts = index.meta["classes"], index.arrays["counts"]
        self.classes = classes if classes is not None else found
        lookup = {name: i for i, name in enumerate(self.classes)}
        unknown = [name for name in found if name not in lookup]
        if unknown:
            raise DataError(
                f"{split_dir}: {len(unknown)} class folders absent from the training split, e.g. {unknown[:3]}"
            )
        self.empty_classes = [name for name, count in zip(found, counts) if not count]
        if self.empty_classes and not allow_empty_classes:
            raise DataError(
                f"{split_dir / self.empty_classes[0]}: empty class folder (no "
                f"{', '.join(IMG_EXTENSIONS)} files); expected {FOLDER_LAYOUT}"
            )
        self.root, self.cache_file = split_dir, index.path
        # NOTE: numpy arrays, not lists of str: 1.28M paths pickle to workers in one buffer,
        # and a memory-mapped cache is shared by every process through the page cache.
        self._paths = index.arrays["paths"]
        remap = np.array([lookup[name] for name in found], dtype=np.int32)
        self._labels = remap[index.arrays["labels"]] if classes is not None else index.arrays["labels"]


def _hf_offline() -> Any:
    """Import `datasets` with the hub switched off: nothing is fetched at run time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError as err:  # an optional piece: folder and tar-shard sources work without it
        fix = "pip install 'datasets>=2.18'"
        raise DataError(f"an HF source needs the `datasets` package, which this Python lacks ({err}): {fix}") from None
    return datasets


def open_hf_split(root_arg: str, split: str, streaming: bool = False, cache_dir: str = "") -> Any:
    """Open one split as a `datasets.Dataset` (or `IterableDataset` when streaming).

    Args:
        root_arg: a hub id in the local cache, a save_to_disk dir or a dir of parquet shards.
        cache_dir: the datasets cache; empty uses HF_DATASETS_CACHE / the default.
    """
    datasets = _hf_offline()
    root = Path(root_arg).expanduser()
    cache_dir = cache_dir or None
    try:
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            loaded = datasets.load_from_disk(str(root))
            if not isinstance(loaded, datasets.DatasetDict):
                # NOTE: one saved Dataset has no split names; reading it for both train and
                # val would validate on the training images without a word.
                raise DataError(
                    f"{root}: holds a single Dataset without splits; save a "
                    f"DatasetDict with '{split}' (DatasetDict({{...}}).save_to_disk)"
                )
            if split not in loaded:
                raise DataError(f"{root}: no split '{split}' (has {', '.join(loaded)})")
            loaded = loaded[split]
            return loaded.to_iterable_dataset() if streaming else loaded
        if root.is_dir():
            files = sorted(glob.glob(str(root / "data" / f"{split}-*.parquet"))) or sorted(
                glob.glob(str(root / f"{split}-*.parquet"))
            )
            if not files:
                raise DataError(f"{root}: no parquet shards for split '{split}'; expected {HF_LAYOUT}")
            return datasets.load_dataset(
                "parquet", data_files={split: files}, split=split, streaming=streaming, cache_dir=cache_dir
            )
        if root.exists() or str(root_arg).startswith((".", "/", "~")):
            raise DataError(f"{root_arg}: not a dataset directory; expected {HF_LAYOUT}")
        return datasets.load_dataset(root_arg, split=split, streaming=streaming, cache_dir=cache_dir)
    except DataError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise DataError(
            f"{root_arg} (split '{split}'): cannot open offline: {str(err).splitlines()[0]}; expected {HF_LAYOUT}"
        ) from None


def _row_sample(row: dict, image_column: str, label_column: str, name: str) -> Sample:
    image = row.get(image_column)
    label = row.get(label_column)
    data = None
    if isinstance(image, dict):
        data = image.get("bytes")
        if data is None and image.get("path") and os.path.isfile(image["path"]):
            with open(image["path"], "rb") as f:
                data = f.read()
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif image is not None and hasattr(image, "save"):  # an already decoded PIL image
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    return Sample(data, -1 if label is None else int(label), name)


def _class_names(features: Any, label_column: str, image_column: str, where: str) -> list[str] | None:
    if features is None:
        return None
    for column in (image_column, label_column):
        if column not in features:
            raise DataError(
                f"{where}: no column '{column}' (columns: {', '.join(features)}); "
                "set data.image_column / data.label_column"
            )
    names = getattr(features[label_column], "names", None)
    return list(names) if names else None


def hf_class_names(
    root: str,
    split: str,
    image_column: str = "image",
    label_column: str = "label",
    cache_dir: str = "",
) -> list[str] | None:
    """A split's `ClassLabel` names from its features alone, no row read; None when the label column has none.

    NOTE: opened as a stream, which reads the schema (parquet metadata, a saved dataset's
    state) without preparing the split; a map-style open would build its arrow cache.
    """
    ds = open_hf_split(root, split, streaming=True, cache_dir=cache_dir)
    return _class_names(ds.features, label_column, image_column, f"{root} [{split}]")


class HFReader:
    """A map-style `datasets.Dataset` split; images are read as bytes, undecoded."""

    def __init__(
        self,
        root: str,
        split: str,
        classes: list[str] | None = None,
        image_column: str = "image",
        label_column: str = "label",
        cache_dir: str = "",
    ) -> None:
        datasets = _hf_offline()
        ds = open_hf_split(root, split, cache_dir=cache_dir)
        names = _class_names(ds.features, label_column, image_column, f"{root} [{split}]")
        ds = ds.select_columns([image_column, label_column])
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        if classes is None:
            # A missing label (None) is skipped by the dataset; it must not break max().
            labels = [label for label in ds[label_column] if label is not None] if not names else []
            classes = names or [str(i) for i in range(int(max(labels, default=-1)) + 1)]
        self.classes, self.split, self._ds, self._columns = classes, split, ds, (image_column, label_column)

    def __len__(self) -> int:
        return len(self._ds)

    def read(self, index: int) -> Sample:
        return _row_sample(self._ds[int(index)], *self._columns, f"{self.split}[{index}]")


class HFStreamReader:
    """A streamed split, sharded across processes; workers split its shards further."""

    def __init__(
        self,
        root: str,
        split: str,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        classes: list[str] | None = None,
        num_classes: int = 0,
        image_column: str = "image",
        label_column: str = "label",
        cache_dir: str = "",
    ) -> None:
        datasets = _hf_offline()
        from datasets.distributed import split_dataset_by_node

        ds = open_hf_split(root, split, streaming=True, cache_dir=cache_dir)
        names = _class_names(ds.features, label_column, image_column, f"{root} [{split}]")
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        if shuffle:
            ds = ds.shuffle(seed=seed, buffer_size=10_000)
        self._ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        self.classes = classes or names or [str(i) for i in range(num_classes)]
        if not self.classes:
            raise DataError(f"{root} [{split}]: streamed labels have no ClassLabel names; set model.num_classes")
        self.split, self._columns = split, (image_column, label_column)

    @property
    def num_samples(self) -> int:
        """Samples in the whole split (all processes), from the dataset's info; 0 when unknown."""
        info = getattr(self._ds, "info", None)
        splits = getattr(info, "splits", None) or {}
        split = splits.get(self.split) if hasattr(splits, "get") else None
        return int(split.num_examples) if split is not None and split.num_examples else 0

    def iter_samples(self, epoch: int) -> Iterator[Sample]:
        self._ds.set_epoch(epoch)
        for i, row in enumerate(self._ds):
            yield _row_sample(row, *self._columns, f"{self.split}[stream {i}]")


class SpreadSubset:
    """`n` samples spread evenly over a reader, so a subset of a class-sorted folder keeps every class."""

    def __init__(self, reader: Reader, n: int) -> None:
        self.reader, self.n, self.classes = reader, n, reader.classes

    @classmethod
    def of(cls, reader: Reader, n: int) -> Reader:
        return cls(reader, n) if 0 < n < len(reader) else reader

    def __len__(self) -> int:
        return self.n

    def read(self, index: int) -> Sample:
        return self.reader.read(index * len(self.reader) // self.n)
