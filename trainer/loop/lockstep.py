"""Lockstep: processes keep stepping together when one's stream shard runs out first.

NOTE: `datasets` gives each process whole shards (files) when they divide evenly, and
files differ in size: a process whose shard ends first must keep stepping, on a stand-in
batch with its loss weighted 0, or the others wait for it in their next all-reduce for
ever. `Lockstep` wraps the loader and pads the stream with empty batches; `StandIn`
supplies what the model trains on in their place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from trainer.data.dataset import collate

log = logging.getLogger("trainer")


class Lockstep:
    """The loader's batches, then (when `pad`) empty batches for ever; `ended` once the loader ran out."""

    def __init__(
        self,
        loader: Iterable[dict[str, Any]],
        pad: bool,
        epoch: int,
        first_batch: int,
        epoch_batches: int,
        process_index: int,
    ) -> None:
        self.loader, self.pad, self.epoch, self.ended = loader, pad, epoch, False
        self.first_batch, self.epoch_batches, self.process_index = first_batch, epoch_batches, process_index

    def __iter__(self) -> Iterator[dict[str, Any]]:
        done = self.first_batch
        for batch in self.loader:
            done += 1
            yield batch
        if not self.pad:
            return
        self.ended = True
        log.warning(
            "epoch %d: process %d's stream shard ran out after %d of the "
            "epoch's %d batches; it steps on with its loss weighted 0 so "
            "that the processes stay in step",
            self.epoch + 1,
            self.process_index,
            done,
            self.epoch_batches,
        )
        while True:
            yield collate([])


def is_empty(batch: dict[str, Any]) -> bool:
    """True for a batch whose every image was skipped (or that pads a finished stream)."""
    return batch["labels"].numel() == 0


class StandIn:
    """The last batch this process trained on, or two blank images before the first."""

    def __init__(self, input_size: tuple[int, int, int], device: torch.device) -> None:
        self.input_size, self.device = input_size, device
        self.last: dict[str, Any] | None = None

    def remember(self, batch: dict[str, Any]) -> None:
        self.last = batch

    def batch(self) -> dict[str, Any]:
        if self.last is None:
            images = torch.zeros(2, *self.input_size, device=self.device)  # already normalized: Normalizer keeps floats
            self.last = {"images": images, "labels": torch.zeros(2, dtype=torch.int64, device=self.device)}
        return self.last
