"""The registry of `data.source`s: each names how to open its splits and what it defaults to.

A source maps the flat `data.*` settings onto its readers' explicit arguments, and owns
what differs between sources: the default val split name, whether it can stream, the
expected layout (for error messages) and what `trainer check-data` can say about it.
Adding a source is one `Source(...)` in its own file plus one line in `SOURCES` below
(and its name in `DataConfig.source`'s choices).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.config import DataConfig
from trainer.data.readers import FOLDER_LAYOUT, HF_LAYOUT, FolderReader, HFReader, HFStreamReader, Reader, StreamReader
from trainer.errors import DataError


@dataclass(frozen=True)
class Source:
    """One `data.source`.

    Attributes:
        name: the `data.source` value.
        layout: the expected layout, quoted by errors.
        default_val_split: the val split when `data.val_split` is empty.
        open: `(cfg, split, classes, rank)` -> a random-access `Reader`; `classes` None takes the
            split's own; `rank` is this process's global index (process 0 builds a file index
            that the others load).
        open_stream: `(cfg, split, rank, world_size, seed, shuffle, classes, num_classes)` -> a
            `StreamReader` sharded by process; None when the source cannot stream.
        open_for_check: like `open` (given the training classes for another split), for
            `trainer check-data`: returns the reader and the classes it found empty (reported,
            not raised); None uses `open` and finds none.
        class_names: `cfg` -> the training classes in index order without reading the split, or
            None where the source cannot tell that way (the reader then finds them).
        labels_from_folders: labels are class folder names, so they are in range by construction
            and class mismatches are told by name (check-data).
    """

    name: str
    layout: str
    default_val_split: str
    open: Callable[[DataConfig, str, list[str] | None, int], Reader]
    open_stream: Callable[..., StreamReader] | None = None
    open_for_check: Callable[[DataConfig, str, list[str] | None], tuple[Reader, list[str]]] | None = None
    labels_from_folders: bool = False
    class_names: Callable[[DataConfig], list[str] | None] | None = None

    def val_split(self, cfg: DataConfig) -> str:
        """`data.val_split`, or this source's default."""
        return cfg.val_split or self.default_val_split


def _folder_root(cfg: DataConfig) -> Path:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: {root} does not exist; expected {FOLDER_LAYOUT}")
    return root


def _is_flat_val(cfg: DataConfig, split_dir: Path, classes: list[str] | None) -> bool:
    """A split other than training, laid out as ILSVRC's flat `val/*.JPEG` plus a labels file."""
    from trainer.data.flat_val import is_flat

    return classes is not None and bool(cfg.val_labels or is_flat(split_dir))


def _open_folder(cfg: DataConfig, split: str, classes: list[str] | None, rank: int = 0) -> Reader:
    root = _folder_root(cfg)
    if _is_flat_val(cfg, root / split, classes):
        from trainer.data.flat_val import FlatValReader, find_labels_file

        return FlatValReader(root / split, find_labels_file(root, root / split, cfg.val_labels), classes)
    return FolderReader(root / split, classes, index_cache=cfg.index_cache, rank=rank, index_wait_s=cfg.index_wait_s)


def _open_folder_for_check(cfg: DataConfig, split: str, classes: list[str] | None) -> tuple[Reader, list[str]]:
    """Class folders are read as found (mismatches are told by name); a flat val takes the training classes."""
    root = _folder_root(cfg)
    if _is_flat_val(cfg, root / split, classes):
        return _open_folder(cfg, split, classes), []
    reader = FolderReader(
        root / split, allow_empty_classes=True, index_cache=cfg.index_cache, index_wait_s=cfg.index_wait_s
    )
    return reader, reader.empty_classes


def _folder_class_names(cfg: DataConfig) -> list[str] | None:
    """Folder names as they are, sorted as the reader indexes them."""
    split_dir = _folder_root(cfg) / cfg.train_split
    if not split_dir.is_dir():
        return None
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir()) or None


def _hf_columns(cfg: DataConfig) -> dict[str, str]:
    return dict(image_column=cfg.image_column, label_column=cfg.label_column, cache_dir=cfg.hf_cache_dir)


def _hf_class_names(cfg: DataConfig) -> list[str] | None:
    """The label column's `ClassLabel` names, when it has them."""
    from trainer.data.readers import hf_class_names

    return hf_class_names(cfg.root, cfg.train_split, **_hf_columns(cfg))


FOLDER = Source(
    name="folder",
    layout=FOLDER_LAYOUT,
    default_val_split="val",
    open=_open_folder,
    open_for_check=_open_folder_for_check,
    labels_from_folders=True,
    class_names=_folder_class_names,
)

HF = Source(
    name="hf",
    layout=HF_LAYOUT,
    default_val_split="validation",
    open=lambda cfg, split, classes, rank=0: HFReader(cfg.root, split, classes, **_hf_columns(cfg)),
    open_stream=lambda cfg, split, rank, world_size, seed, shuffle, classes=None, num_classes=0: HFStreamReader(
        cfg.root, split, rank, world_size, seed, shuffle, classes, num_classes, **_hf_columns(cfg)
    ),
    class_names=_hf_class_names,
)


def _open_shards(cfg: DataConfig, split: str, classes: list[str] | None, rank: int = 0) -> Reader:
    from trainer.data.wds import TarShardReader

    return TarShardReader(
        Path(cfg.root).expanduser(),
        split,
        classes,
        index_cache=cfg.index_cache,
        rank=rank,
        index_wait_s=cfg.index_wait_s,
    )


def _stream_shards(
    cfg: DataConfig, split: str, rank: int, world_size: int, seed: int, shuffle: bool, classes=None, num_classes=0
) -> StreamReader:
    from trainer.data.wds import TarShardStream

    return TarShardStream(Path(cfg.root).expanduser(), split, rank, world_size, seed, shuffle, classes, num_classes)


def _wds_class_names(cfg: DataConfig) -> list[str] | None:
    """The names `trainer convert` wrote into `_info.json`."""
    from trainer.data.wds import read_info

    names = read_info(Path(cfg.root).expanduser()).get("classes")
    return [str(c) for c in names] if isinstance(names, list) and names else None


WDS = Source(
    name="wds",
    layout="ROOT/<name>-<split>-NNNN.tar shards of <key>.jpg + <key>.cls "
    "members (timm's imagenet-1k-wds), optional ROOT/_info.json",
    default_val_split="validation",
    open=_open_shards,
    open_stream=_stream_shards,
    class_names=_wds_class_names,
)

SOURCES: dict[str, Source] = {source.name: source for source in (FOLDER, HF, WDS)}


def get_source(name: str) -> Source:
    """The registered source called `name`; a one-line DataError for any other."""
    try:
        return SOURCES[name]
    except KeyError:
        raise DataError(f"data.source: unknown source '{name}' (registered: {', '.join(SOURCES)})") from None


def create_reader(cfg: DataConfig, split: str, classes: list[str] | None = None, rank: int = 0) -> Reader:
    """A random-access reader for one split of the configured source (`rank`: this process's global index)."""
    return get_source(cfg.source).open(cfg, split, classes, rank)


def create_stream_reader(
    cfg: DataConfig,
    split: str,
    rank: int,
    world_size: int,
    seed: int,
    shuffle: bool,
    classes: list[str] | None = None,
    num_classes: int = 0,
) -> StreamReader:
    """A reader that streams one split, this process's shard of it."""
    source = get_source(cfg.source)
    if source.open_stream is None:
        raise DataError(
            f"data.streaming: the {source.name} source does not stream "
            "(streaming sources: "
            f"{', '.join(s.name for s in SOURCES.values() if s.open_stream)})"
        )
    return source.open_stream(cfg, split, rank, world_size, seed, shuffle, classes, num_classes)


def class_names(cfg: DataConfig) -> list[str] | None:
    """The training split's class names without reading the split, where the source can tell; else None."""
    names = get_source(cfg.source).class_names
    return names(cfg) if names is not None else None
