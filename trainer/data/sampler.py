"""RepeatAugSampler: timm's repeated augmentation, as (epoch, index, copy) keys in a fixed global order.

timm's `RepeatAugSampler` (DeiT's "repeated augmentation"): each epoch shuffles the
images, repeats each `num_repeats` times, deals the list round-robin to the processes
(`indices[rank::world]`, so the copies of one image go to different processes) and keeps
`floor(N // 256 * 256 / world)` per process, so an epoch stays about one pass long.

Here Accelerate shards the sampler's batches (process r takes global batches r, r + world,
...), so the global order is built to give each process exactly timm's share, batch by
batch. The order is a pure function of (seed, epoch): a resumed run skips the batches
already trained on and sees the rest unchanged. Each copy carries its number, so the
dataset seeds its augmentation differently per copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

SELECTED_ROUND = 256  # timm's default: each epoch a multiple of 256 images in all


class RepeatAugSampler(Sampler):
    """Yields (epoch, index, copy) keys; `len` is the global number of samples per epoch."""

    def __init__(self, num_samples: int, num_repeats: int, seed: int, num_replicas: int, batch_size: int) -> None:
        self.num_samples, self.num_repeats, self.seed = num_samples, num_repeats, seed
        self.num_replicas, self.batch_size, self.epoch = num_replicas, batch_size, 0
        if num_samples >= SELECTED_ROUND:
            per_process = int(math.floor(num_samples // SELECTED_ROUND * SELECTED_ROUND / num_replicas))
        else:  # as timm: fewer images than one round keep one pass
            per_process = math.ceil(num_samples / num_replicas)
        self.total_size = math.ceil(num_samples * num_repeats / num_replicas) * num_replicas
        per_process = min(per_process, self.total_size // num_replicas)
        # Whole batches only, as the train loader drops the last partial one.
        self.batches_per_process = per_process // batch_size
        self.per_process = per_process

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_process * self.batch_size * self.num_replicas

    def process_share(self, rank: int) -> list[tuple[int, int, int]]:
        """The keys timm's sampler would give process `rank` this epoch, in order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        repeated = [(i, c) for i in order for c in range(self.num_repeats)]
        n = len(repeated)
        positions = range(rank, self.total_size, self.num_replicas)[: self.per_process]  # wrapping round to pad, as timm
        return [(self.epoch, *repeated[p % n]) for p in positions]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        shares = [self.process_share(r) for r in range(self.num_replicas)]
        b = self.batch_size
        for j in range(self.batches_per_process):
            for share in shares:
                yield from share[j * b : (j + 1) * b]
