"""Tests for trainer.run_dir and trainer.summary: what a run writes, its start and end summaries,
and existing run directories (a new run stops with one line, resume continues, overwrite replaces;
never duplicate rows)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import helpers
from trainer.backend import create_accelerator
from trainer.checkpoint import TrainState
from trainer.config import load_config
from trainer.metrics import read_steps
from trainer.run_dir import RunDirectory, describe_run
from trainer.summary import end_summary, processes


def run_directory(tmp_path: Path) -> RunDirectory:
    cfg = load_config(
        None, [f"data.root={tmp_path}", f"output.dir={tmp_path / 'runs'}", "output.run_name=r", "output.plots=false"]
    )
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
    import timm

    run = run_directory(tmp_path)
    run.prepare()
    input_config = {
        "input_size": (3, 16, 16),
        "interpolation": "bilinear",
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "crop_pct": 1.0,
    }
    folder = run.export(timm.create_model("test_resnet", num_classes=2), classes=["a", "b"], input_config=input_config)
    assert folder == run.path / "model"
    for path in (
        folder / "model.safetensors",
        folder / "config.json",
        folder / "README.md",
        run.path / "model.safetensors",
    ):
        assert path.stat().st_mode & 0o044 == 0o044, path  # group and others may read, as config.yaml
    assert (run.path / "model.safetensors").samefile(folder / "model.safetensors")  # the earlier path, the same file


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


REPO = Path(__file__).resolve().parent.parent


def test_describe_run_of_an_empty_or_config_only_directory_is_empty(tmp_path):
    assert describe_run(tmp_path / "absent") == ""
    (tmp_path / "config.yaml").write_text("{}")
    assert describe_run(tmp_path) == ""


def test_describe_run_names_finished_and_last_step(tmp_path):
    (tmp_path / "checkpoints" / "step_00000012").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000012" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_00000020").mkdir()  # incomplete: no trainer_state.json
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"epoch": 0, "step": 6}) + "\n" + json.dumps({"epoch": 1, "step": 12}) + '\n{"epo'
    )
    assert describe_run(tmp_path) == "not finished, last step 12, 2 epoch(s) recorded"
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert describe_run(tmp_path).startswith("finished, last step 12")


def train(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--config", str(config), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_rerun_into_a_run_stops_resume_continues_overwrite_replaces(tmp_path):
    data = helpers.make_image_folder(tmp_path / "data")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "test_resnet"},
                "data": {"root": str(data)},
                "loader": {"batch_size_per_device": 6, "workers": 0},
                "input": {"img_size": 32},
                "train": {"epochs": 2, "precision": "fp32", "channels_last": False},
                "output": {"dir": str(tmp_path / "runs"), "run_name": "run", "progress": "log", "plots": False},
            }
        )
    )
    run_dir = tmp_path / "runs" / "run"
    assert train(config).returncode == 0
    weights = (run_dir / "model.safetensors").read_bytes()

    again = train(config)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1, again.stderr
    assert f"{run_dir} already holds a run (finished, last step 6, 2 epoch(s) recorded)" in lines[0]
    assert "train.resume=auto" in lines[0] and "output.run_name=" in lines[0] and "output.overwrite=true" in lines[0]
    assert epochs(run_dir) == [0, 1] and (run_dir / "model.safetensors").read_bytes() == weights

    assert train(config, "train.resume=auto", "train.epochs=3").returncode == 0
    assert epochs(run_dir) == [0, 1, 2]

    assert train(config, "output.overwrite=true").returncode == 0
    assert epochs(run_dir) == [0, 1]
    assert (run_dir / "model.safetensors").read_bytes() == weights  # the same recipe again, from scratch
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]

    # Killed after an epoch's record but before any checkpoint: resume=auto starts over
    # and writes that epoch's record once.
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "model.safetensors").unlink()
    assert train(config, "train.resume=auto").returncode == 0
    assert epochs(run_dir) == [0, 1]
