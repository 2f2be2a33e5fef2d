"""Figures and per-class tables from a run directory.

Reads ``metrics.jsonl`` (one JSON object per epoch) and writes PNGs under
``run_dir/plots/``. Drawing uses ``matplotlib.figure.Figure`` with an explicit Agg
canvas rather than pyplot, so it never touches global backend state, needs no
display, and is safe to call from a background thread of a running trainer.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from trainer.metrics import METRICS_FILENAME, MetricsFileError, read_metrics, read_steps

__all__ = [
    "METRICS_FILENAME",
    "MetricsFileError",
    "read_metrics",
    "write_plots",
    "write_confusion_matrix",
    "write_per_class_csv",
    "plot_command",
]

PLOTS_DIRNAME = "plots"
FIG_WIDTH_IN = 8.0
FIG_HEIGHT_IN = 5.0
FIG_DPI = 100  # 8 x 5 in at 100 dpi -> 800 x 500 px
CONFUSION_FIG_IN = 10.0  # square: 1000 x 1000 px at FIG_DPI
MAX_CONFUSION_CLASSES = 100  # beyond this the cells are sub-pixel noise; use the CSV
MAX_ANNOTATED_CLASSES = 20  # counts written in cells only while they stay legible
MAX_NAMED_CLASSES = 40  # above this, ticks show class indices instead of names
LOG_LR_SPAN = 10.0  # lr axis goes logarithmic when max/min exceeds this

TRAIN_COLOR, VAL_COLOR = "tab:blue", "tab:orange"
EMA_COLOR = "tab:purple"  # the EMA weights' validation, when ema.enabled


@dataclass(frozen=True)
class _FigureSpec:
    filename: str
    title: str
    ylabel: str
    series: tuple[tuple[str, str, str], ...]  # (metrics key, legend label, color)
    percent: bool = False  # stored as fractions, shown as %
    y_from_zero: bool = False  # else autoscaling turns +-2% jitter into full-height zigzags


_FIGURES = (
    _FigureSpec(
        "loss.png",
        "Loss",
        "cross-entropy loss",
        (("train_loss", "train", TRAIN_COLOR), ("val_loss", "val", VAL_COLOR), ("val_loss_ema", "val EMA", EMA_COLOR)),
    ),
    _FigureSpec(
        "top1.png",
        "Top-1 accuracy",
        "top-1 accuracy (%)",
        (("train_top1", "train", TRAIN_COLOR), ("val_top1", "val", VAL_COLOR), ("val_top1_ema", "val EMA", EMA_COLOR)),
        percent=True,
    ),
    _FigureSpec(
        "top5.png",
        "Top-5 accuracy",
        "top-5 accuracy (%)",
        (("val_top5", "val", VAL_COLOR), ("val_top5_ema", "val EMA", EMA_COLOR)),
        percent=True,
    ),
    _FigureSpec("lr.png", "Learning rate", "learning rate", (("lr", "lr", "tab:green"),)),
    _FigureSpec(
        "throughput.png",
        "Training throughput",
        "throughput (img/s)",
        (("img_per_s", "train", TRAIN_COLOR),),
        y_from_zero=True,
    ),
)


def _series(records: list[dict], key: str, x_key: str = "epoch") -> tuple[list[int], list[float]]:
    """Returns (x, values) for the records where ``key`` is present and non-null.

    Epochs are counted from 1 here, as the logs and the final summary count them; the
    records count from 0. Steps are counted as the records count them.
    """
    first = 1 if x_key == "epoch" else 0
    points = [(r[x_key] + first, float(r[key])) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _new_figure(width_in: float, height_in: float) -> Any:
    # Imported here so reading metrics and writing CSVs work without matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _write_atomic(path: Path, write: Callable[[IO], None], mode: str = "b") -> Path:
    """Writes via a temp file beside ``path`` and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would survive the rename and hide plots from other users.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        text_kwargs = {} if mode == "b" else {"newline": "", "encoding": "utf-8"}
        with open(tmp, "x" + mode, **text_kwargs) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _save_png(fig: Any, path: Path) -> Path:
    # No bbox_inches="tight": it would crop and break the fixed pixel size.
    return _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=FIG_DPI))


def _format_log_axis(ax: Any, span: float) -> None:
    """Labels a log y-axis 0.02 / 0.1 instead of matplotlib's default 2x10^-2."""
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))

    def minor(y: float, _: int) -> str:
        # Label 2, 3 and 5 of each decade only while few decades show; more would crowd.
        mantissa = round(y / 10 ** math.floor(math.log10(y)))
        return f"{y:g}" if span <= 100 and mantissa in (2, 3, 5) else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _draw_metric(spec: _FigureSpec, records: list[dict], run_name: str, x_key: str = "epoch") -> Any | None:
    """Draws one metric figure over epochs (or `x_key` "step"), or returns None when every series is missing."""
    from matplotlib.ticker import MaxNLocator

    series = [(key, label, color, *_series(records, key, x_key)) for key, label, color in spec.series]
    series = [s for s in series if s[3]]
    if not series:
        return None
    scale = 100.0 if spec.percent else 1.0
    fig = _new_figure(FIG_WIDTH_IN, FIG_HEIGHT_IN)
    ax = fig.add_subplot()
    for key, label, color, epochs, values in series:
        ys = [v * scale for v in values]
        # Markers keep a 1-epoch or gappy (eval every N epochs) series visible.
        ax.plot(epochs, ys, marker="o", markersize=4, linewidth=1.8, color=color, label=label)
        if key == "val_top1" and any(math.isfinite(y) for y in ys):
            best = int(np.nanargmax(ys))
            # Label in the legend, not beside the star: a free-floating label collides
            # with the train curve or leaves the axes when the best epoch is the last.
            ax.axhline(ys[best], color=color, linestyle="--", linewidth=0.8, alpha=0.6)
            ax.plot(
                epochs[best],
                ys[best],
                marker="*",
                markersize=16,
                color=color,
                markeredgecolor="black",
                linestyle="none",
                zorder=5,
                label=f"best val {ys[best]:.2f}% @ epoch {epochs[best]}",
            )
    if spec.filename == "lr.png":
        positive = [v for s in series for v in s[4] if v > 0]
        if positive and max(positive) / min(positive) > LOG_LR_SPAN:
            ax.set_yscale("log")
            _format_log_axis(ax, max(positive) / min(positive))
            ax.grid(True, which="minor", alpha=0.15)
    top = max((v * scale for s in series for v in s[4] if math.isfinite(v)), default=0.0)
    if spec.y_from_zero and top > 0:  # headroom by hand: a fixed bottom ends autoscale margins
        ax.set_ylim(0, 1.1 * top)
    all_epochs = [e for s in series for e in s[3]]
    if min(all_epochs) == max(all_epochs):
        ax.set_xlim(all_epochs[0] - 0.5, all_epochs[0] + 0.5)  # autoscale collapses on 1 point
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{spec.title} \u2014 {run_name}")
    ax.set_xlabel("epoch" if x_key == "epoch" else "optimizer step")
    ax.set_ylabel(spec.ylabel)
    ax.grid(True, which="major", alpha=0.35)
    if len(ax.get_legend_handles_labels()[0]) > 1:  # a lone curve needs no legend
        ax.legend(loc="best")
    return fig


def write_plots(run_dir: Path) -> list[Path]:
    """Writes loss, top-1, top-5, lr and throughput PNGs to ``run_dir/plots/``.

    The lr is drawn per logged step from ``steps.jsonl`` when the run wrote one, else per epoch.

    Each is ``FIG_WIDTH_IN`` x ``FIG_HEIGHT_IN`` inches at ``FIG_DPI``. A figure whose
    series are all missing (e.g. no validation yet) is skipped.

    Args:
        run_dir: Run directory holding ``metrics.jsonl``.

    Returns:
        Paths of the PNGs written, in a fixed order.
    """
    run_dir = Path(run_dir)
    records, steps = read_metrics(run_dir), read_steps(run_dir)
    written = []
    for spec in _FIGURES:
        # The lr per logged step where the run logged steps: a warmup shows, as it does not per epoch.
        by_step = spec.filename == "lr.png" and any(r.get("lr") is not None for r in steps)
        fig = (
            _draw_metric(spec, steps, run_dir.resolve().name, "step")
            if by_step
            else _draw_metric(spec, records, run_dir.resolve().name)
        )
        if fig is not None:
            written.append(_save_png(fig, run_dir / PLOTS_DIRNAME / spec.filename))
    return written


def _as_confusion(confusion: Any, class_names: Sequence[str]) -> np.ndarray:
    """Validates a [true, pred] count matrix (array or tensor) and returns it as int64."""
    if hasattr(confusion, "detach"):  # a torch tensor, possibly on an accelerator
        confusion = confusion.detach().cpu().numpy()
    matrix = np.asarray(confusion)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {matrix.shape}")
    if matrix.shape[0] != len(class_names):
        raise ValueError(
            f"confusion matrix has {matrix.shape[0]} classes but {len(class_names)} class names were given"
        )
    if (matrix < 0).any():
        raise ValueError("confusion matrix holds negative counts")
    return matrix.astype(np.int64)


def write_confusion_matrix(confusion: Any, class_names: Sequence[str], path: Path) -> Path:
    """Draws a row-normalised confusion matrix (rows: true class, columns: predicted).

    Colour is the fraction of each true class predicted as each column, so rare and
    common classes read alike; raw counts are written in cells for small matrices.

    Args:
        confusion: Square integer array or tensor of counts indexed ``[true, pred]``.
        class_names: One name per class, in index order.
        path: Where to write the PNG, ``CONFUSION_FIG_IN`` inches square; returned.

    Raises:
        ValueError: If the matrix is not square, does not match ``class_names``, or
            has more than ``MAX_CONFUSION_CLASSES`` classes.
    """
    num_classes = len(class_names)
    if num_classes > MAX_CONFUSION_CLASSES:
        raise ValueError(
            f"refusing to draw a confusion matrix for {num_classes} classes "
            f"(max {MAX_CONFUSION_CLASSES}); use write_per_class_csv instead"
        )
    counts = _as_confusion(confusion, class_names)
    row_sums = counts.sum(axis=1, keepdims=True)
    # Classes absent from the eval set get an all-zero row instead of 0/0 = NaN.
    normalised = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)

    fig = _new_figure(CONFUSION_FIG_IN, CONFUSION_FIG_IN)
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class")
    if num_classes <= MAX_NAMED_CLASSES:
        ticks, labels, axis_suffix = np.arange(num_classes), list(class_names), ""
        ax.set_xticks(ticks, labels=labels, rotation=90, fontsize=10 if num_classes <= 20 else 7)
        ax.set_yticks(ticks, labels=labels, fontsize=10 if num_classes <= 20 else 7)
    else:  # names would be a few unreadable pixels tall; indices match the CSV instead
        ticks, axis_suffix = np.arange(0, num_classes, 10), " (index)"
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
    if num_classes <= MAX_ANNOTATED_CLASSES:
        for true_idx, pred_idx in np.ndindex(counts.shape):
            dark = normalised[true_idx, pred_idx] > 0.5  # white text on dark cells
            ax.text(
                pred_idx,
                true_idx,
                str(counts[true_idx, pred_idx]),
                ha="center",
                va="center",
                fontsize=9,
                color="white" if dark else "black",
            )
    accuracy = np.trace(counts) / max(int(counts.sum()), 1)
    ax.set_title(f"Confusion matrix (row-normalised), accuracy {accuracy:.2%}")
    ax.set_xlabel("predicted class" + axis_suffix)
    ax.set_ylabel("true class" + axis_suffix)
    return _save_png(fig, Path(path))


def write_per_class_csv(confusion: Any, class_names: Sequence[str], path: Path) -> Path:
    """Writes per-class sample count, correct count and accuracy as CSV.

    Columns are ``class_index, class_name, samples, correct, accuracy``; accuracy is
    a fraction, left empty for a class with no samples rather than a fake 0.

    Args:
        confusion: Square integer array or tensor of counts indexed ``[true, pred]``.
        class_names: One name per class, in index order.
        path: Where to write the CSV; returned.
    """
    counts = _as_confusion(confusion, class_names)

    def write(f: IO) -> None:
        writer = csv.writer(f)
        writer.writerow(["class_index", "class_name", "samples", "correct", "accuracy"])
        for idx, name in enumerate(class_names):
            samples, correct = int(counts[idx].sum()), int(counts[idx, idx])
            writer.writerow([idx, name, samples, correct, f"{correct / samples:.6f}" if samples else ""])

    return _write_atomic(Path(path), write, mode="t")


def plot_command(run_dir: str) -> int:
    """Entry point for ``trainer plot RUN_DIR``: writes the plots and prints their paths.

    Args:
        run_dir: Run directory holding ``metrics.jsonl``.

    Returns:
        Exit status: 0 on success, 2 if the directory or metrics file is missing or
        malformed (reported as one line on stderr).
    """
    directory = Path(run_dir)
    metrics_path = directory / METRICS_FILENAME
    if not directory.is_dir():
        print(f"trainer plot: run directory not found: {directory}", file=sys.stderr)
        return 2
    if not metrics_path.is_file():
        print(f"trainer plot: metrics file not found: {metrics_path}", file=sys.stderr)
        return 2
    try:
        paths = write_plots(directory)
    except MetricsFileError as e:
        print(f"trainer plot: {e}", file=sys.stderr)
        return 2
    if not paths:
        print(f"trainer plot: {metrics_path} has no metrics to plot yet", file=sys.stderr)
    for path in paths:
        print(path)
    return 0
