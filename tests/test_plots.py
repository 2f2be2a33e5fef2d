"""Tests for trainer.plots: metrics parsing, figure files, confusion outputs, CLI entry."""

from __future__ import annotations

import csv
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRIC_SIZE_PX = (int(plots.FIG_WIDTH_IN * plots.FIG_DPI), int(plots.FIG_HEIGHT_IN * plots.FIG_DPI))
ALL_FIGURES = ["loss.png", "top1.png", "top5.png", "lr.png", "throughput.png"]


def _record(epoch: int, with_val: bool = True) -> dict:
    """A plausible epoch of an ImageNet run: loss falls, accuracy rises, cosine lr."""
    record = {
        "epoch": epoch,
        "step": (epoch + 1) * 1000,
        "train_loss": 6.9 * math.exp(-0.3 * epoch) + 1.0,
        "train_top1": 0.7 * (1 - math.exp(-0.4 * epoch)),
        "lr": 0.5 * 0.5 * (1 + math.cos(math.pi * epoch / 10)) + 1e-4,
        "img_per_s": 2900.0 + 10 * epoch,
        "epoch_time_s": 440.0,
    }
    if with_val:
        record.update(
            val_loss=record["train_loss"] - 0.2,
            val_top1=record["train_top1"] + 0.03,
            val_top5=min(1.0, record["train_top1"] + 0.2),
        )
    return record


def _write_jsonl(run_dir: Path, lines: list) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (run_dir / plots.METRICS_FILENAME).write_text(text + "\n")
    return run_dir


def _assert_png(path: Path, size_px: tuple[int, int]) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == size_px


def test_write_plots_writes_every_figure_at_fixed_size(tmp_path: Path) -> None:
    run_dir = _write_jsonl(tmp_path / "run", [_record(e) for e in range(10)])
    written = plots.write_plots(run_dir)
    assert [p.name for p in written] == ALL_FIGURES
    for path in written:
        assert path.parent == run_dir / plots.PLOTS_DIRNAME
        _assert_png(path, METRIC_SIZE_PX)
    # No temp files left behind by the atomic write.
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == sorted(ALL_FIGURES)


def test_plots_are_readable_by_others_per_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        run_dir = _write_jsonl(tmp_path / "run", [_record(0)])
        path = plots.write_plots(run_dir)[0]
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_read_metrics_deduplicates_resumed_epochs_last_wins(tmp_path: Path) -> None:
    crashed = dict(_record(1), train_loss=123.0)
    run_dir = _write_jsonl(tmp_path, [_record(0), crashed, _record(2), _record(1), ""])
    records = plots.read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[1]["train_loss"] == _record(1)["train_loss"]


def test_missing_and_null_val_keys_are_tolerated(tmp_path: Path) -> None:
    no_val = _record(0, with_val=False)
    null_val = dict(_record(1, with_val=False), val_loss=None, val_top1=None, val_top5=None)
    run_dir = _write_jsonl(tmp_path, [no_val, null_val, _record(2)])
    names = [p.name for p in plots.write_plots(run_dir)]
    assert names == ALL_FIGURES  # epoch 2 has val, so every figure still has a series


def test_figure_with_all_series_missing_is_skipped(tmp_path: Path) -> None:
    run_dir = _write_jsonl(tmp_path, [_record(e, with_val=False) for e in range(3)])
    names = [p.name for p in plots.write_plots(run_dir)]
    assert names == ["loss.png", "top1.png", "lr.png", "throughput.png"]


def test_edge_values_still_render(tmp_path: Path) -> None:
    """One epoch, a constant lr, and a diverged (non-finite) loss must not crash drawing."""
    run_dir = _write_jsonl(tmp_path / "one", [dict(_record(0), lr=0.1)])
    assert len(plots.write_plots(run_dir)) == len(ALL_FIGURES)
    diverged = [dict(_record(e), lr=0.1, train_loss=float("nan") if e == 2 else 1.0) for e in range(4)]
    run_dir = _write_jsonl(tmp_path / "nan", diverged)  # json.dumps writes NaN
    for path in plots.write_plots(run_dir):
        _assert_png(path, METRIC_SIZE_PX)


def test_malformed_line_error_names_file_and_line(tmp_path: Path) -> None:
    run_dir = _write_jsonl(tmp_path, [_record(0), _record(1), '{"epoch": 2, "train_loss": '])
    with pytest.raises(plots.MetricsFileError, match=r"metrics\.jsonl:3:"):
        plots.read_metrics(run_dir)


def test_line_without_integer_epoch_is_rejected(tmp_path: Path) -> None:
    run_dir = _write_jsonl(tmp_path, [_record(0), {"epoch": "1"}])
    with pytest.raises(plots.MetricsFileError, match=r":2: .*'epoch'"):
        plots.read_metrics(run_dir)


# Rows are true classes, columns predictions. Class 2 has no samples at all.
HAND_CONFUSION = np.array([[8, 1, 1], [2, 3, 0], [0, 0, 0]])


def test_per_class_csv_matches_hand_built_confusion(tmp_path: Path) -> None:
    path = plots.write_per_class_csv(HAND_CONFUSION, ["cat", "dog", "émeu"], tmp_path / "c.csv")
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["class_index", "class_name", "samples", "correct", "accuracy"]
    assert [(r["class_index"], r["class_name"], r["samples"], r["correct"]) for r in rows] == [
        ("0", "cat", "10", "8"),
        ("1", "dog", "5", "3"),
        ("2", "émeu", "0", "0"),
    ]
    assert float(rows[0]["accuracy"]) == pytest.approx(0.8)
    assert float(rows[1]["accuracy"]) == pytest.approx(0.6)
    assert rows[2]["accuracy"] == ""  # undefined, not a fake 0


def test_confusion_matrix_png_from_tensor(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = plots.write_confusion_matrix(
        torch.tensor(HAND_CONFUSION), ["cat", "dog", "emu"], tmp_path / "sub" / "confusion.png"
    )
    side_px = int(plots.CONFUSION_FIG_IN * plots.FIG_DPI)
    _assert_png(path, (side_px, side_px))


def test_confusion_matrix_at_class_limit_renders(tmp_path: Path) -> None:
    n = plots.MAX_CONFUSION_CLASSES
    confusion = np.eye(n, dtype=int) * 5 + 1
    path = plots.write_confusion_matrix(confusion, [f"c{i}" for i in range(n)], tmp_path / "c.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_confusion_matrix_refuses_too_many_classes(tmp_path: Path) -> None:
    n = plots.MAX_CONFUSION_CLASSES + 1
    with pytest.raises(ValueError, match=rf"{n} classes.*max {plots.MAX_CONFUSION_CLASSES}"):
        plots.write_confusion_matrix(np.eye(n, dtype=int), [str(i) for i in range(n)], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_confusion_rejects_mismatched_names_and_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="square"):
        plots.write_per_class_csv(np.zeros((2, 3), int), ["a", "b"], tmp_path / "c.csv")
    with pytest.raises(ValueError, match="3 classes but 2 class names"):
        plots.write_per_class_csv(HAND_CONFUSION, ["a", "b"], tmp_path / "c.csv")


def test_plot_command_prints_paths(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = _write_jsonl(tmp_path, [_record(e) for e in range(3)])
    assert plots.plot_command(str(run_dir)) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == ALL_FIGURES


def test_plot_command_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no_such_run"
    assert plots.plot_command(str(missing)) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "not found" in err and err.count("\n") == 1


def test_plot_command_missing_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert plots.plot_command(str(tmp_path)) == 2
    assert str(tmp_path / plots.METRICS_FILENAME) in capsys.readouterr().err


def test_plot_command_malformed_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = _write_jsonl(tmp_path, ["not json"])
    assert plots.plot_command(str(run_dir)) == 2
    assert "metrics.jsonl:1:" in capsys.readouterr().err


def test_epochs_are_counted_from_one_as_in_the_logs() -> None:
    # Records count epochs from 0; the final summary says "(epoch 2)" for the second one.
    records = [_record(0), {**_record(1), "val_top1": 0.9}, _record(2)]
    spec = next(s for s in plots._FIGURES if s.filename == "top1.png")
    fig = plots._draw_metric(spec, records, "run")
    ax = fig.axes[0]
    assert list(ax.get_lines()[0].get_xdata()) == [1, 2, 3]
    assert any(label.endswith("@ epoch 2") for label in ax.get_legend_handles_labels()[1])


def test_lr_is_drawn_per_logged_step_so_warmup_shows(tmp_path: Path) -> None:
    run_dir = _write_jsonl(tmp_path / "warm", [_record(0), _record(1)])
    steps = [{"step": s, "lr": 0.1 * min(1.0, s / 4), "loss": 1.0} for s in range(1, 9)]  # warmup over 4 steps
    (run_dir / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    assert run_dir / "plots" / "lr.png" in plots.write_plots(run_dir)
    spec = next(s for s in plots._FIGURES if s.filename == "lr.png")
    ax = plots._draw_metric(spec, plots.read_steps(run_dir), "warm", "step").axes[0]
    assert ax.get_xlabel() == "optimizer step"
    assert list(ax.lines[0].get_ydata()) == pytest.approx([s["lr"] for s in steps])
