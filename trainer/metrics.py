"""Top-k accuracy, on-device running sums, and the per-epoch metrics files (written and read here).

torch is imported where it is used, so that `trainer plot` reads metrics.jsonl without it.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

METRICS_FILENAME = "metrics.jsonl"
STEPS_FILENAME = "steps.jsonl"  # one record per logged step: step, loss, top1, lr, img_per_s
METRIC_KEYS = (
    "epoch",
    "step",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "lr",
    "img_per_s",
    "epoch_time_s",
    "train_samples",
    "val_samples",
    "skipped",
    "val_skipped",
    "val_loss_ema",
    "val_top1_ema",
    "val_top5_ema",
    "grad_norm",
)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Per-sample 0/1 hits for each k (k is capped at the number of classes)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hits = top.eq(labels.unsqueeze(1))
    return [hits[:, : min(k, maxk)].any(dim=1) for k in ks]


# Sums that count things (hits, images, updates): integer-valued, kept as integers.
COUNT_NAMES = ("top1", "top5", "n", "steps")


class RunningSums:
    """Sums kept on the device, so the training loop never waits for the host.

    `add` queues device work only; `totals` is the one place that syncs.

    NOTE: no float64 on the device: an MLU stores and computes float64 as float32 (torch_mlu
    aten/utils/types.cpp; CNCL sends it as float32 too), where an image count stops being
    exact past 2**24 and a loss summed over an epoch drifts with the number of steps.
    Counts (`counts`, by default the names in COUNT_NAMES) are int64, exact everywhere; the
    other sums are float32 with Kahan compensation, whose error stays at float32's rounding
    of the total however many steps are added. The arithmetic is the same on every device,
    so CPU and MLU runs sum alike.
    """

    def __init__(self, device: torch.device, names: tuple[str, ...], counts: tuple[str, ...] | None = None) -> None:
        import torch

        counts = tuple(n for n in names if n in COUNT_NAMES) if counts is None else counts
        self.names = names
        self.count_index = [i for i, name in enumerate(names) if name in counts]
        self.float_index = [i for i, name in enumerate(names) if name not in counts]
        self.counts = torch.zeros(len(self.count_index), dtype=torch.int64, device=device)
        self.floats = torch.zeros(len(self.float_index), dtype=torch.float32, device=device)
        self.compensation = torch.zeros_like(self.floats)  # Kahan: the low part `floats` lost, negated

    def add(self, *values: torch.Tensor) -> None:
        import torch

        if self.count_index:
            self.counts += torch.stack([values[i].detach().to(torch.int64) for i in self.count_index])
        if self.float_index:
            self._add_floats(torch.stack([values[i].detach().to(torch.float32) for i in self.float_index]))

    def _add_floats(self, floats: torch.Tensor) -> None:
        corrected = floats - self.compensation
        total = self.floats + corrected
        self.compensation = (total - self.floats) - corrected
        self.floats = total

    def fold(self, other: RunningSums) -> None:
        """Add `other`'s sums (the same names) to these."""
        self.counts += other.counts
        self._add_floats(other.floats - other.compensation)

    def local_totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 counts, float32 sums) on the device, each in name order within its kind."""
        return self.counts, self.floats - self.compensation

    def _merge(self, counts: list[int], floats: list[float]) -> dict[str, float]:
        values = [0.0] * len(self.names)
        for i, value in zip(self.count_index, counts):
            values[i] = float(value)
        for i, value in zip(self.float_index, floats):
            values[i] = float(value)
        return dict(zip(self.names, values))

    def totals(self) -> dict[str, float]:
        counts, floats = self.local_totals()
        return self._merge(counts.tolist(), floats.tolist())

    def kahan_state(self) -> dict[str, float]:
        """The float sums as their compensated pairs, `kahan_sum:<name>` and `kahan_compensation:<name>`.

        NOTE: `load` given these continues the summation exactly where it was: from the
        rounded totals alone (compensation 0) the later additions round differently, and a
        resumed epoch's train loss would differ from an uninterrupted one's in its last bits.
        """
        names = [self.names[i] for i in self.float_index]
        return {
            **{f"kahan_sum:{n}": v for n, v in zip(names, self.floats.tolist())},
            **{f"kahan_compensation:{n}": v for n, v in zip(names, self.compensation.tolist())},
        }

    def load(self, totals: dict[str, float]) -> None:
        """Start from `totals` (a resumed epoch's sums so far, with `kahan_state`'s pairs where
        stored); names it lacks start at 0."""
        import torch

        self.reset()
        values = [totals.get(name, 0.0) for name in self.names]
        if self.count_index:
            self.counts.copy_(torch.tensor([round(values[i]) for i in self.count_index], dtype=torch.int64))
        if self.float_index:
            names = [self.names[i] for i in self.float_index]
            sums = [totals.get(f"kahan_sum:{n}", values[i]) for n, i in zip(names, self.float_index)]
            self.floats.copy_(torch.tensor(sums, dtype=torch.float32))
            compensation = [totals.get(f"kahan_compensation:{n}", 0.0) for n in names]
            self.compensation.copy_(torch.tensor(compensation, dtype=torch.float32))

    def reset(self) -> None:
        self.counts.zero_()
        self.floats.zero_()
        self.compensation.zero_()


def _clean(value: Any) -> Any:
    # JSON has no NaN; a diverged loss is written as null rather than breaking readers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fresh_line(path: Path) -> str:
    """ "\n" when `path` ends mid-line, else "".

    NOTE: a crash can leave a line without its newline; the next record starts on a fresh
    one instead of being glued to it (which would break both the jsonl and the csv reader).
    """
    if not path.exists() or not path.stat().st_size:
        return ""
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return "" if f.read(1) == b"\n" else "\n"


class MetricsWriter:
    """Appends one record per epoch to metrics.jsonl and metrics.csv, and one per logged step to steps.jsonl."""

    def __init__(self, run_dir: Path) -> None:
        self.steps = run_dir / STEPS_FILENAME
        self.jsonl = run_dir / METRICS_FILENAME
        self.csv = run_dir / "metrics.csv"

    def drop_from_epoch(self, epoch: int) -> None:
        """Forget the records of `epoch` and later (a resumed run writes them again)."""
        if not self.jsonl.exists():
            return
        records = read_metrics(self.jsonl.parent, skip_malformed=True)  # a line cut short by a kill is dropped
        kept = [r for r in records if r["epoch"] < epoch]
        if len(kept) == len(records):
            return
        self.jsonl.unlink()
        self.csv.unlink(missing_ok=True)
        for record in kept:
            self.write(record)

    def drop_after_step(self, step: int) -> None:
        """Forget the step records after `step` (a resumed run writes them again)."""
        if not self.steps.exists():
            return
        records = read_steps(self.steps.parent)
        self.steps.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))

    def write_step(self, record: dict[str, Any]) -> None:
        """Append a logged step's record (no fsync: a lost line costs one point of a curve)."""
        with open(self.steps, "a") as f:
            f.write(_fresh_line(self.steps) + json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

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


def reduce_sums(accelerator: Any, sums: RunningSums, skipped: int, **counts: int) -> dict[str, float]:
    """Every process's sums, skipped count and `counts`, added up: {name: total, "skipped": total, **counts}.

    NOTE: two SUM all-reduces, counts as int64 and sums as float32: CNCL has no AVG and no
    float64 (it sends float64 as float32), so neither is asked of it.
    """
    import torch

    local_counts, floats = sums.local_totals()
    extra = torch.tensor([skipped, *counts.values()], dtype=torch.int64, device=local_counts.device)
    totals = accelerator.reduce(torch.cat([local_counts, extra]), "sum").tolist()
    floats = accelerator.reduce(floats.clone(), "sum").tolist() if sums.float_index else []
    n = len(local_counts)
    return {**sums._merge(totals[:n], floats), **dict(zip(("skipped", *counts), map(float, totals[n:])))}


class MetricsFileError(ValueError):
    """A line of ``metrics.jsonl`` could not be parsed; the message names file and line."""


def read_metrics(run_dir: Path, skip_malformed: bool = False) -> list[dict]:
    """Parses ``run_dir/metrics.jsonl`` into one record per epoch, sorted by epoch.

    A run resumed after a crash re-logs the epochs it repeats, so the last line for
    an epoch wins. Blank lines are skipped.

    Args:
        run_dir: Run directory holding ``metrics.jsonl``.
        skip_malformed: drop lines that do not parse (a kill can cut the last one short)
            instead of raising.

    Raises:
        FileNotFoundError: If the metrics file does not exist.
        MetricsFileError: If a line is not a JSON object with an integer ``epoch``.
    """
    path = Path(run_dir) / METRICS_FILENAME
    by_epoch: dict[int, dict] = {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if skip_malformed:
                    continue
                raise MetricsFileError(f"{path}:{line_no}: malformed JSON ({e.msg})") from e
            epoch = record.get("epoch") if isinstance(record, dict) else None
            # bool is an int subclass; reject it so `true` is not read as epoch 1.
            if not isinstance(epoch, int) or isinstance(epoch, bool):
                if skip_malformed:
                    continue
                raise MetricsFileError(f"{path}:{line_no}: expected a JSON object with an integer 'epoch'")
            by_epoch[epoch] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_steps(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/steps.jsonl``, one per logged step, sorted by step; [] when absent.

    Lines that do not parse are skipped: these records only draw curves.
    """
    path = Path(run_dir) / STEPS_FILENAME
    by_step: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]
