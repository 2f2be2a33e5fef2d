"""The demo's dataset: scikit-learn's 1,797 handwritten digits as an ImageNet-layout folder.

The digits ship inside scikit-learn, so the demo needs no download, and writing them as
JPEGs in `train/<class>/` and `val/<class>/` sends the demo through the same folder
reader, decoder and transforms as ImageNet.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = [f"digit_{i}" for i in range(10)]
IMAGE_SIZE_PX = 32  # the 8x8 digits upscaled: ResNet50's stem needs more than 8 pixels
VAL_EVERY = 5  # every 5th image of each class goes to val: a stratified 80/20 split


def write_digits(root: Path) -> Path:
    """Write the digits under `root` once; return `root`. Safe to call again.

    The folder is built next to `root` and renamed into place, so a run killed half way
    never leaves a partial dataset that later runs would take as complete.
    """
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    seen = np.zeros(10, dtype=int)
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        split = "val" if seen[label] % VAL_EVERY == VAL_EVERY - 1 else "train"
        seen[label] += 1
        folder = tmp / split / CLASS_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        # Pixels are 0..16 ink; white paper with dark ink, like a scanned digit.
        gray = (255 - pixels * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(gray, mode="L").resize((IMAGE_SIZE_PX, IMAGE_SIZE_PX), Image.BICUBIC)
        image.convert("RGB").save(folder / f"{i:04d}.JPEG", quality=95)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, root)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return root
