"""ImageNet's own validation layout: a flat `val/*.JPEG` and a labels file.

No shell script to sort the 50,000 images into class folders first. Two labels formats:

- Kaggle's `LOC_val_solution.csv`: `ImageId,PredictionString`, the first token of the
  prediction string being the wnid (`ILSVRC2012_val_00008726,n02119789 255 142 454 329 ...`);
- a plain `file,class` CSV (a header row is optional), the file with or without its
  extension, the class a training class folder name.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from trainer.data.readers import IMG_EXTENSIONS, DataError, PathListReader

LABEL_FILES = ("LOC_val_solution.csv", "val_labels.csv")
FLAT_LAYOUT = "ROOT/val/*.JPEG with ROOT/LOC_val_solution.csv (Kaggle) or a file,class CSV named by data.val_labels"


def is_flat(split_dir: Path) -> bool:
    """True when `split_dir` holds images and no sub-folders (reads entries until it can tell)."""
    if not split_dir.is_dir():
        return False
    images = False
    with os.scandir(split_dir) as entries:
        for entry in entries:
            if entry.is_dir():
                return False
            images = images or entry.name.lower().endswith(IMG_EXTENSIONS)
    return images


def find_labels_file(root: Path, split_dir: Path, configured: str) -> Path:
    """`data.val_labels` if set, else the first of LABEL_FILES found in the root or the split folder."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise DataError(f"data.val_labels: {path} not found; expected {FLAT_LAYOUT}")
        return path
    for folder in (root, split_dir):
        for name in (*LABEL_FILES, f"{split_dir.name}_labels.csv"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(
        f"{split_dir}: flat images without class folders and no labels "
        f"file ({', '.join(LABEL_FILES)}) in {root}; set data.val_labels; "
        f"expected {FLAT_LAYOUT}"
    )


def read_labels(path: Path) -> dict[str, str]:
    """File stem -> class name, from either format; a malformed row is a one-line error."""
    labels: dict[str, str] = {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"data.val_labels: {path}: cannot read: {err}") from None
    if not rows:
        raise DataError(f"data.val_labels: {path}: empty labels file; expected {FLAT_LAYOUT}")
    kaggle = [c.strip() for c in rows[0][:2]] == ["ImageId", "PredictionString"]
    header = kaggle or (len(rows[0]) >= 2 and rows[0][1].strip().lower() in ("class", "label", "wnid", "synset"))
    for line, row in enumerate(rows[1:] if header else rows, 2 if header else 1):
        if not row or not "".join(row).strip():
            continue
        fields = [c.strip() for c in row]
        cls = fields[1].split()[0] if len(fields) >= 2 and fields[1].split() else ""
        if not fields[0] or not cls:
            raise DataError(
                f"data.val_labels: {path} line {line}: expected "
                f"{'ImageId,PredictionString' if kaggle else 'file,class'}, got "
                f"{','.join(row)!r}"
            )
        stem = Path(fields[0]).stem if fields[0].lower().endswith(IMG_EXTENSIONS) else fields[0]
        if labels.setdefault(stem, cls) != cls:
            raise DataError(f"data.val_labels: {path} line {line}: {stem} labelled both {labels[stem]} and {cls}")
    return labels


class FlatValReader(PathListReader):
    """Images of a flat split folder, labelled by a labels file, with the training classes."""

    def __init__(self, split_dir: Path, labels_file: Path, classes: list[str]) -> None:
        labels = read_labels(labels_file)
        with os.scandir(split_dir) as entries:
            files = sorted(e.name for e in entries if e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file())
        stems = {Path(name).stem: name for name in files}
        unlabelled = [name for stem, name in stems.items() if stem not in labels]
        missing = [stem for stem in labels if stem not in stems]
        if unlabelled or missing:
            examples = ", ".join(
                filter(
                    None,
                    (unlabelled[:1] and f"unlabelled {unlabelled[0]}", missing[:1] and f"no image for {missing[0]}"),
                )
            )
            raise DataError(
                f"{split_dir}: {len(unlabelled)} of {len(files)} images have no label in {labels_file} and "
                f"{len(missing)} of its {len(labels)} labels have no image (e.g. "
                f"{examples}); the labels file must match the folder"
            )
        lookup = {name: i for i, name in enumerate(classes)}
        unknown = sorted({cls for cls in labels.values() if cls not in lookup})
        if unknown:
            raise DataError(
                f"{labels_file}: {len(unknown)} classes absent from the training "
                f"split, e.g. {unknown[0]} (classes are the training folder names)"
            )
        self.classes, self.root, self.labels_file = classes, split_dir, labels_file
        self._paths = np.array(files, dtype=np.bytes_)
        self._labels = np.array([lookup[labels[Path(name).stem]] for name in files], dtype=np.int32)
