"""Tests for trainer.run_dir and trainer.summary: what a run writes, and its start and end summaries."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.backend import create_accelerator
from trainer.checkpoint import TrainState
from trainer.config import load_config
from trainer.metrics import read_steps
from trainer.run_dir import RunDirectory
from trainer.summary import end_summary, processes


def run_directory(tmp_path: Path) -> RunDirectory:
    cfg = load_config(None, [f"data.root={tmp_path}", f"output.dir={tmp_path / 'runs'}", "output.run_name=r", "output.plots=false"])
    acc, _ = create_accelerator("cpu", "fp32")
    return RunDirectory(cfg, acc)


def test_prepare_writes_the_config_that_reruns(tmp_path: Path):
    run = run_directory(tmp_path)
    run.prepare()
    assert load_config(run.path / "config.yaml").output.run_name == "r"


def test_records_skips_epochs_and_steps(tmp_path: Path):
    run = run_directory(tmp_path)
    run.prepare()
    assert run.record_skipped(["a.JPEG\tbroken", "b.JPEG\tempty"]) == 2
    assert (run.path / "skipped.txt").read_text() == "a.JPEG\tbroken\nb.JPEG\tempty\n"
    run.write_step({"step": 2, "loss": 1.0, "lr": 0.01})
    run.write_step({"step": 4, "loss": float("nan"), "lr": 0.02})
    run.write_epoch({"epoch": 0, "step": 4, "train_loss": 1.0})
    assert [s["lr"] for s in read_steps(run.path)] == [0.01, 0.02] and read_steps(run.path)[1]["loss"] is None
    assert json.loads((run.path / "metrics.jsonl").read_text())["step"] == 4
    run.metrics.drop_after_step(2)  # a resume from step 2
    assert [s["step"] for s in read_steps(run.path)] == [2]


def test_export_is_readable_by_others(tmp_path: Path):
    run = run_directory(tmp_path)
    run.prepare()
    path = run.export(torch.nn.Linear(2, 2))
    assert path.stat().st_mode & 0o044 == 0o044  # group and others may read, as config.yaml


def test_summaries_say_what_people_check(tmp_path: Path):
    _, backend = create_accelerator("cpu", "fp32")
    assert processes(backend) == "cpu, 1 process, not distributed"
    history = [
        {"epoch": 0, "val_top1": 0.5, "val_top5": 0.9, "train_samples": 10, "epoch_time_s": 2.0},
        {"epoch": 1, "val_top1": 0.4, "val_top5": 0.8, "train_samples": 10, "epoch_time_s": 2.0},
    ]
    text = end_summary(history, 5.0, tmp_path / "model.safetensors", tmp_path / "checkpoints")
    assert "top-1 0.5000 top-5 0.9000 (epoch 1)" in text and "5.0 img/s mean" in text
    assert TrainState().global_step == 0
