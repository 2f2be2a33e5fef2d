"""Decode and transform: the one pipeline both readers feed.

Augmentation randomness is keyed by (seed, epoch, sample index), not by worker or by how
many samples came before. That is what makes a resumed run bit-identical to an
uninterrupted one: skipped batches are never loaded, yet every later sample sees the
same random crop and flip, whatever the number of workers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler

from trainer.data.decode import DecodeError, decode_image, decode_image_array
from trainer.data.readers import Reader, Sample, StreamReader
from trainer.data.tensor_transform import run_plan, tensor_plan


@dataclass(frozen=True)
class Skipped:
    """A sample that could not be used; collate drops it and the trainer reports it."""

    name: str
    reason: str


def sample_seed(seed: int, epoch: int, index: int) -> int:
    # NOTE: a fixed mix, not hash(): Python salts str hashes per process.
    return ((seed * 1_000_003 + epoch) * 2_654_435_761 + index) % (2**63)


class EpochSampler(Sampler):
    """Yields (epoch, index) keys in a per-epoch order seeded by (seed, epoch)."""

    def __init__(self, num_samples: int, shuffle: bool, seed: int) -> None:
        self.num_samples, self.shuffle, self.seed, self.epoch = num_samples, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = range(self.num_samples)
        return ((self.epoch, i) for i in order)


class _SampleDecoder:
    """Bytes -> transformed image, or a `Skipped` (on_error=skip) naming the sample.

    A transform with uint8 output runs on tensors (`tensor_plan`): the image is decoded
    straight to an array and never becomes a PIL image.
    """

    def __init__(self, transform: Callable, num_classes: int, draft_size: int | None, on_error: str, seed: int) -> None:
        self.transform, self.num_classes, self.draft_size = transform, num_classes, draft_size
        self.on_error, self.seed = on_error, seed
        self.plan = tensor_plan(transform)

    def __call__(self, sample: Sample, epoch: int, index: int) -> tuple[Any, int] | Skipped:
        try:
            if sample.data is None:
                raise DecodeError(sample.name, "row has no image")
            if not 0 <= sample.label < self.num_classes:
                raise DecodeError(sample.name, f"label {sample.label} out of range [0, {self.num_classes})")
            if self.plan is not None:
                # (H, W, 3) memory viewed as (3, H, W): the layout torch's uint8 resize is fastest on.
                image = torch.from_numpy(
                    decode_image_array(sample.data, sample.name, draft_size=self.draft_size)
                ).permute(2, 0, 1)
            else:
                image = decode_image(sample.data, sample.name, draft_size=self.draft_size)
            # Seed only this sample's augmentation; the caller's RNG state is put back.
            # NOTE: numpy too: timm's RandAugment picks its ops with np.random.choice.
            py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
            try:
                s = sample_seed(self.seed, epoch, index)
                random.seed(s)
                np.random.seed([s & 0xFFFFFFFF, s >> 32])  # legacy seeding takes uint32 words
                torch.random.default_generator.manual_seed(s)
                if self.plan is not None:
                    return run_plan(self.plan, image), sample.label
                return self.transform(image), sample.label
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
                torch.random.set_rng_state(torch_state)
        except DecodeError as err:
            if self.on_error == "raise":
                raise
            return Skipped(err.name, err.reason)


class ImageDataset(Dataset):
    """Map-style dataset over a `Reader`, indexed by `EpochSampler` keys."""

    def __init__(self, reader: Reader, decoder: _SampleDecoder) -> None:
        if not isinstance(reader, Reader):
            raise TypeError(f"{type(reader).__name__} does not implement the Reader interface")
        self.reader, self.decoder = reader, decoder

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, key: tuple[int, ...] | int) -> tuple[Any, int] | Skipped:
        """Keys are (epoch, index), (epoch, index, copy) from RepeatAugSampler, or a bare index."""
        epoch, index, *copy = key if isinstance(key, tuple) else (0, key)
        # NOTE: each repeated copy of an image gets its own augmentation seed.
        augment_index = index + copy[0] * len(self.reader) if copy else index
        try:
            sample = self.reader.read(index)
        except OSError as err:
            sample = Sample(None, -1, getattr(err, "filename", None) or f"sample {index}")
            if self.decoder.on_error == "raise":
                raise DecodeError(sample.name, f"unreadable: {err.strerror or err}") from None
            return Skipped(sample.name, f"unreadable: {err.strerror or err}")
        return self.decoder(sample, epoch, augment_index)


class StreamingImageDataset(IterableDataset):
    """Iterable dataset over a `StreamReader`; the reader shards by process and worker."""

    def __init__(self, reader: StreamReader, decoder: _SampleDecoder) -> None:
        if not isinstance(reader, StreamReader):
            raise TypeError(f"{type(reader).__name__} does not implement the StreamReader interface")
        self.reader, self.decoder, self.epoch = reader, decoder, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Any, int] | Skipped]:
        for i, sample in enumerate(self.reader.iter_samples(self.epoch)):
            yield self.decoder(sample, self.epoch, i)


def collate(items: list[tuple[Any, int] | Skipped]) -> dict[str, Any]:
    """Stack images (uint8 arrays or float tensors) and labels; list what was skipped."""
    kept = [item for item in items if not isinstance(item, Skipped)]
    skipped = [f"{item.name}\t{item.reason}" for item in items if isinstance(item, Skipped)]
    if kept and isinstance(kept[0][0], np.ndarray):
        images = torch.from_numpy(np.stack([image for image, _ in kept]))
    elif kept:
        images = torch.stack([image for image, _ in kept])
    else:
        images = torch.empty(0)
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    return {"images": images, "labels": labels, "skipped": skipped}
