"""Progressive resizing: the train crop size as a pure function of the epoch, and the train
loader rebuilt when it changes (FFCV's ResNet50 recipes train at 160 px growing to 192 and
test at 224).

`input.train_size_schedule` is a list of [epoch, px] pairs, epochs counted from 0 as in
metrics.jsonl: each size holds from its epoch until the next entry's. The val crop is not
scheduled (`input.test_img_size`, else `input.img_size`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("trainer")

EXAMPLE = "[[0, 160], [12, 192]]"


def schedule_problem(schedule: list) -> str:
    """Why `schedule` cannot be used as `input.train_size_schedule`, or "" when it can."""
    pairs = all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in p)
        for p in schedule
    )
    if not pairs:
        return f"must be a list of [epoch, px] integer pairs such as {EXAMPLE}"
    epochs = [epoch for epoch, _ in schedule]
    if schedule and epochs[0] != 0:
        return f"must start at epoch 0 (epochs count from 0), as in {EXAMPLE}"
    if any(later <= earlier for earlier, later in zip(epochs, epochs[1:])):
        return "epochs must increase from one entry to the next"
    if any(px <= 0 for _, px in schedule):
        return "sizes must be > 0"
    return ""


def train_size_at(schedule: list, epoch: int, default: int) -> int:
    """The train crop size at `epoch` (from 0): the last entry at or before it; `default` without a schedule."""
    return next((px for start, px in reversed(schedule) if start <= epoch), default)


def describe_schedule(schedule: list) -> str:
    """ "160 px, 192 px from epoch 13" (epochs from 1, as the log shows them)."""
    return ", ".join(f"{px} px" + (f" from epoch {start + 1}" if start else "") for start, px in schedule)


def stop_workers(loader: Any) -> None:
    """Shut down a loader's persistent workers now rather than whenever it is collected.

    NOTE: they hold the dataset as it was pickled when they started, transform and all, so
    they cannot be told about a new size; and left to the garbage collector, a cycle could
    keep a set of idle workers (and their memory) alive beside the new loader's.
    """
    base = getattr(loader, "base_dataloader", loader)  # Accelerate's DataLoaderShard wraps the DataLoader
    iterator = getattr(base, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if iterator is not None:
        base._iterator = None


class TrainResize:
    """The train loader for an epoch: the same one, or a new one at the schedule's new size.

    `rebuild(px)` rebuilds the train dataset's transform at `px` and returns a new placed
    loader over it; the old loader's workers are stopped first. A resumed run calls this
    before skipping the batches already done, so the rest of its epoch is loaded at the
    epoch's size, exactly as in the uninterrupted run.
    """

    def __init__(self, schedule: list, size: int, rebuild: Callable[[int], Any]) -> None:
        self.schedule, self.size, self.rebuild = schedule, size, rebuild

    def __call__(self, epoch: int, loader: Any) -> Any:
        size = train_size_at(self.schedule, epoch, self.size)
        if size == self.size:
            return loader
        log.info("epoch %d: train images now %d px (were %d; input.train_size_schedule)", epoch + 1, size, self.size)
        stop_workers(loader)
        self.size = size
        return self.rebuild(size)
