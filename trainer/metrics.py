"""Top-k accuracy, on-device running sums, and the per-epoch metrics files."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

METRIC_KEYS = ("epoch", "step", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "img_per_s", "epoch_time_s", "train_samples", "val_samples", "skipped", "val_skipped",
               "val_loss_ema", "val_top1_ema", "val_top5_ema", "grad_norm")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Per-sample 0/1 hits for each k (k is capped at the number of classes)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hits = top.eq(labels.unsqueeze(1))
    return [hits[:, : min(k, maxk)].any(dim=1) for k in ks]


class RunningSums:
    """Sums kept on the device, so the training loop never waits for the host.

    `add` queues device work only; `totals` is the one place that syncs.
    """

    def __init__(self, device: torch.device, names: tuple[str, ...]) -> None:
        self.names = names
        self.values = torch.zeros(len(names), dtype=torch.float64, device=device)

    def add(self, *values: torch.Tensor) -> None:
        self.values += torch.stack([v.detach().to(torch.float64) for v in values])

    def totals(self) -> dict[str, float]:
        return dict(zip(self.names, self.values.tolist()))

    def reset(self) -> None:
        self.values.zero_()


def _clean(value: Any) -> Any:
    # JSON has no NaN; a diverged loss is written as null rather than breaking readers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fresh_line(path: Path) -> str:
    """"\n" when `path` ends mid-line, else "".

    NOTE: a crash can leave a line without its newline; the next record starts on a fresh
    one instead of being glued to it (which would break both the jsonl and the csv reader).
    """
    if not path.exists() or not path.stat().st_size:
        return ""
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return "" if f.read(1) == b"\n" else "\n"


class MetricsWriter:
    """Appends one record per epoch to metrics.jsonl and metrics.csv in the run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"

    def drop_from_epoch(self, epoch: int) -> None:
        """Forget the records of `epoch` and later (a resumed run writes them again)."""
        if not self.jsonl.exists():
            return
        records = []
        for line in self.jsonl.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        kept = [r for r in records if r.get("epoch", -1) < epoch]
        if len(kept) == len(records):
            return
        self.jsonl.unlink()
        self.csv.unlink(missing_ok=True)
        for record in kept:
            self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        line = json.dumps(record)
        with open(self.jsonl, "a") as f:
            f.write(_fresh_line(self.jsonl) + line + "\n")
            f.flush()
            os.fsync(f.fileno())
        new = not self.csv.exists() or self.csv.stat().st_size == 0
        columns = list(METRIC_KEYS)
        if not new:  # keep the columns the file started with (a run resumed by another version)
            with open(self.csv, newline="") as f:
                columns = next(csv.reader(f), None) or columns
        prefix = "" if new else _fresh_line(self.csv)
        with open(self.csv, "a", newline="") as f:
            f.write(prefix)
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: ("" if record.get(k) is None else record.get(k)) for k in columns})
