"""EpochOrderSampler: an epoch as one global order of samples, resumable at any sample on any number of processes.

Every process builds the same order from (seed, epoch) and yields it from `start` on;
Accelerate's batch sharding then deals it out in batches of `batch_size_per_device`,
batch j of what is left to process j % processes, whole rounds only. So:

- an optimizer step takes the next `global batch` samples of the order, however many
  processes share it (per device x processes x accumulation), and its micro-batches are
  the same runs of `batch_size_per_device` samples: on 2 processes they are two
  processes' batches, on 1 process two accumulated micro-batches;
- a checkpoint needs only the samples done (`TrainState.samples_done`); a run resumed on
  any number of processes yields the rest of the same order, so every sample of the
  epoch is trained on exactly once.

The epoch is a whole number of `epoch_unit` samples (the global batch when
`loader.global_batch_size` is set, else one round of per-device batches): the rest of
the order is dropped, as a loader's `drop_last` drops a partial batch, and the epoch's
length is the same on every process count.

With repeated augmentation (`aug.repeated_aug`, timm's `RepeatAugSampler`, DeiT) each
image appears `repeats` times in a row, the copies numbered (the dataset seeds each copy's
augmentation apart), and each epoch keeps timm's length: the images rounded down to a
multiple of 256 (all of them when fewer). timm deals the repeated list round-robin to the
processes, so the copies of an image go to different processes; here each block of
`epoch_unit` samples is dealt round-robin to its micro-batches instead (`epoch_unit /
batch_size` of them), which is timm's share per process when there is no accumulation and
stays the same order whatever the process count.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

SELECTED_ROUND = 256  # timm's RepeatAugSampler default: each epoch a multiple of 256 images in all


class EpochOrderSampler(Sampler):
    """Yields (epoch, index) keys, or (epoch, index, copy) with repeats: the epoch's order from `start` on."""

    def __init__(self, num_samples: int, *, seed: int, epoch_unit: int, batch_size: int, repeats: int = 1) -> None:
        self.num_samples, self.seed, self.repeats = num_samples, seed, max(repeats, 1)
        self.epoch_unit, self.batch_size = epoch_unit, batch_size
        self.epoch, self.start = 0, 0
        selected = num_samples
        if self.repeats > 1 and num_samples >= SELECTED_ROUND:
            selected = num_samples // SELECTED_ROUND * SELECTED_ROUND
        self.epoch_samples = selected // epoch_unit * epoch_unit

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, samples_done: int) -> None:
        """Yield the epoch from this many samples on (a resumed epoch); 0 for a whole one."""
        self.start = min(max(samples_done, 0), self.epoch_samples)

    def __len__(self) -> int:
        return self.epoch_samples - self.start

    def order(self) -> list[tuple[int, ...]]:
        """The epoch's samples in training order (before the layout that spreads repeated copies)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g).tolist()
        if self.repeats == 1:
            return [(self.epoch, i) for i in perm[: self.epoch_samples]]
        return [(self.epoch, i, c) for i in perm for c in range(self.repeats)][: self.epoch_samples]

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        rest = self.order()[self.start :]
        if self.repeats == 1:
            return iter(rest)
        return iter(spread_copies(rest, block=self.epoch_unit, lanes=max(self.epoch_unit // self.batch_size, 1)))


def spread_copies(keys: list, *, block: int, lanes: int) -> list:
    """Each `block` of keys dealt round-robin to `lanes` micro-batches, laid one after another.

    Consecutive keys (the copies of one image) land in consecutive micro-batches, which
    Accelerate gives to different processes; a block's set of keys is unchanged.
    """
    out: list = []
    for first in range(0, len(keys), block):
        chunk = keys[first : first + block]
        for lane in range(lanes):
            out.extend(chunk[lane::lanes])
    return out
