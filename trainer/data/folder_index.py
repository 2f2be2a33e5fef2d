"""The file list of an ImageNet-layout split folder, scanned once per job (see index_cache)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from trainer.data import index_cache
from trainer.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FOLDER_LAYOUT = "ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG (the ImageNet layout)"

FORMAT = 1  # bump when the arrays change meaning


def class_folders(split_dir: Path) -> list[os.DirEntry]:
    """The split's class folders, sorted by name: one listing of the split folder."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: split folder not found; expected {FOLDER_LAYOUT}")
    return sorted((e for e in os.scandir(split_dir) if e.is_dir()), key=lambda e: e.name)


def fingerprint(split_dir: Path, folders: list[os.DirEntry]) -> dict:
    """What the index depends on, read without listing any class folder."""
    return {
        "format": FORMAT,
        "dir": str(split_dir.resolve()),
        "extensions": list(IMG_EXTENSIONS),
        "classes": [e.name for e in folders],
        "mtime_ns": [e.stat().st_mtime_ns for e in folders],
    }


def stale_reason(new: dict):
    """A function telling, from an old key, what changed since (for the one log line)."""

    def reason(old: dict) -> str:
        old_classes, new_classes = old.get("classes", []), new["classes"]
        added, removed = sorted(set(new_classes) - set(old_classes)), sorted(set(old_classes) - set(new_classes))
        if added or removed:
            return f"{len(added)} class folders added, {len(removed)} removed, e.g. {(added or removed)[0]}"
        old_mtimes = dict(zip(old_classes, old.get("mtime_ns", [])))
        changed = [c for c, m in zip(new_classes, new["mtime_ns"]) if old_mtimes.get(c) != m]
        if changed:
            return f"files added or removed in {len(changed)} class folders, e.g. {changed[0]}"
        return "written by another version"

    return reason


def scan(split_dir: Path, folders: list[os.DirEntry]) -> tuple[dict[str, np.ndarray], dict]:
    """List every class folder: relative paths and labels (index into the sorted folders).

    NOTE: each class becomes a small numpy array at once, so the peak memory is about
    twice the final arrays (80 MB at 1.28 M files), not a list of 1.28 M Python strings
    (~150 MB) and its copies.
    """
    parts, counts = [], []
    for entry in folders:
        names = sorted(
            e.name for e in os.scandir(entry.path) if e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file()
        )
        parts.append(np.array([f"{entry.name}/{n}" for n in names], dtype=np.bytes_))
        counts.append(len(names))
    width = max((p.dtype.itemsize for p in parts), default=1)
    paths, start = np.empty(sum(counts), dtype=f"S{width}"), 0
    for i, count in enumerate(counts):  # each part freed once copied: peak about twice the final array
        paths[start : start + count], parts[i] = parts[i], None
        start += count
    labels = np.repeat(np.arange(len(folders), dtype=np.int32), counts)
    return {"paths": paths, "labels": labels, "counts": np.array(counts, dtype=np.int64)}, {
        "classes": [e.name for e in folders]
    }


def folder_index(split_dir: Path, cache: str = "off", rank: int = 0, wait_s: float = 600.0) -> index_cache.CachedIndex:
    """The index of `split_dir` (arrays paths, labels, counts; meta classes), cached per `cache`.

    Args:
        cache: `data.index_cache` ("" auto, "off", or a directory).
        rank: This process's global index: 0 builds, the others wait for its file.
        wait_s: `data.index_wait_s`.
    """
    folders = class_folders(split_dir)
    if not folders:
        raise DataError(
            f"{split_dir}: no class folders; expected {FOLDER_LAYOUT} (a flat "
            "ImageNet val/ needs a labels file: data.val_labels)"
        )
    key = fingerprint(split_dir, folders)
    path = index_cache.cache_path(cache, split_dir, split_dir.name)
    return index_cache.load_or_build(
        path, key, lambda: scan(split_dir, folders), f"folder index of {split_dir}", rank, wait_s, stale_reason(key)
    )
