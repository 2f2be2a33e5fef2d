"""`trainer bench` through the real CLI on a tiny JPEG folder: figures, JSON, verdict; no timing asserts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
MEASUREMENTS = ("model_step", "input_pipeline", "end_to_end")


def jpeg_folder(root: Path) -> Path:
    """2 classes x 8 train images of 64x48 (and 2 val each), each class its own colour."""
    for split, count in (("train", 8), ("val", 2)):
        for label, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                image = Image.new("RGB", (64, 48), colour)
                image.paste((255, 255, 255), (4 * i, 3 * i, 4 * i + 12, 3 * i + 12))
                image.save(folder / f"{i}.JPEG", quality=90)
    return root


def bench(tmp_path: Path, workers: int, *extra: str) -> subprocess.CompletedProcess:
    config = {
        "model": {"name": "test_resnet"},
        "data": {"root": str(jpeg_folder(tmp_path / "data"))},
        "loader": {"batch_size_per_device": 4, "workers": workers},
        "input": {"img_size": 32},
        "train": {"precision": "fp32"},
        "output": {"dir": str(tmp_path / "runs"), "run_name": "bench"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "trainer", "bench", "--config", str(path), "--steps", "2", "--warmup", "1", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("workers, json_arg", [(0, None), (1, "elsewhere/figures.json")])
def test_bench_reports_three_measurements_and_the_bound(tmp_path: Path, workers: int, json_arg: str | None) -> None:
    proc = bench(tmp_path, workers, *(["--json", str(tmp_path / json_arg)] if json_arg else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = tmp_path / json_arg if json_arg else tmp_path / "runs" / "bench" / "bench.json"  # RUN_DIR/bench.json
    figures = json.loads(written.read_text())
    for name in MEASUREMENTS:
        assert figures[name]["img_per_s"] > 0 and figures[name]["step_s_median"] > 0, name
        assert figures[name]["steps"] == 2
    assert figures["input_pipeline"]["img_per_s_per_worker"] > 0 and figures["input_pipeline"]["img_per_s_per_core"] > 0
    assert figures["setup"]["workers"] == workers and figures["setup"]["model"] == "test_resnet"
    assert figures["bound"] in ("input", "device")
    assert isinstance(figures["verdict"], str) and figures["verdict"].startswith(f"{figures['bound']}-bound:")
    for line in ("model step", "input pipeline", "end to end", f"bound: {figures['bound']}"):
        assert line in proc.stdout, (line, proc.stdout)


@pytest.mark.slow
def test_bench_measures_at_the_scheduled_size_of_an_epoch(tmp_path: Path) -> None:
    proc = bench(tmp_path, 0, "input.train_size_schedule=[[0,24],[2,40]]", "--epoch", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((tmp_path / "runs" / "bench" / "bench.json").read_text())
    assert (figures["setup"]["img_size"], figures["setup"]["epoch"]) == (40, 2)
    assert "test_resnet 40px (epoch 2 of input.train_size_schedule)" in proc.stdout, proc.stdout


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--warmup", "-1"), ("--epoch", "-1")])
def test_bad_step_counts_exit_2_with_one_line(tmp_path: Path, flag: str, value: str) -> None:
    proc = bench(tmp_path, 0, flag, value)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"trainer: error: {flag} must be >= {1 if flag == '--steps' else 0}, got {value}"
    ]
