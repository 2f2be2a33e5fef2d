"""`trainer doctor` under `accelerate launch`: 2 CPU processes (gloo) and 2 emulated MLUs (cncl)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import helpers

REPO = Path(__file__).resolve().parent.parent
EMULATED = REPO / "tests" / "emulated_mlu"
pytestmark = pytest.mark.slow
LAUNCH_CONFIGS = {"cpu": "cpu_2proc.yaml", "mlu": "mlu_2card.yaml"}
PRECISION = {"cpu": "fp32", "mlu": "fp16"}
NEWEST_LINE_IS_2_1 = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 3)


def setup(tmp_path: Path, device: str) -> Path:
    helpers.make_image_folder(tmp_path / "work" / "data")
    cfg = {
        "model": {"name": "test_resnet"},
        "data": {"root": "data"},
        # relative: each process reads it from its own working directory
        "loader": {"workers": 0, "batch_size_per_device": 4, "global_batch_size": 16},
        "train": {"precision": PRECISION[device]},
        "backend": {"collective_timeout_s": 60},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def doctor(
    tmp_path: Path, device: str, config: Path, hide_root_from_rank: int | None = None
) -> subprocess.CompletedProcess:
    """Two processes of `trainer doctor`; one may run where data.root does not exist (a node without the data)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLU_VISIBLE_DEVICES", "CN_VISIBLE_DEVICES")}
    paths = [str(REPO)] + ([str(EMULATED)] if device == "mlu" else [])
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    hide = (
        (f'if [ "$LOCAL_RANK" = {hide_root_from_rank} ]; then cd {shlex.quote(str(tmp_path / "elsewhere"))}; fi; ')
        if hide_root_from_rank is not None
        else ""
    )
    script = (
        f"{hide}exec {shlex.quote(sys.executable)} -m trainer doctor "
        f"--config {shlex.quote(str(config))} --bandwidth-mb 4"
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs/accelerate" / LAUNCH_CONFIGS[device]),
        "--main_process_port",
        str(helpers.free_port()),
        "--no_python",
        "sh",
        "-c",
        script,
    ]
    return subprocess.run(cmd, cwd=tmp_path / "work", env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("device", ["cpu", "mlu"])
def test_doctor_passes_and_prints_one_row_per_process(tmp_path, device):
    proc = doctor(tmp_path, device, setup(tmp_path, device))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "trainer doctor: OK" in out and "2 process(es) checked, 0 problem(s)" in out
    # derived for 2 processes
    assert ("batch: 4/device x 2 processes x 2 accumulation = global 16 (loader.global_batch_size)") in out
    rows = [line.split() for line in out.splitlines() if line[:1] in ("0", "1") and len(line.split()) >= 9]
    assert [r[0] for r in rows] == ["0", "1"], out
    devices = [r[2] for r in rows]
    assert devices == ["mlu:0", "mlu:1"] if device == "mlu" else all(d.startswith("cpu") for d in devices), out
    assert all(PRECISION[device] in r for r in rows), out
    assert all(r[-2] == "3" for r in rows), out  # the 3 classes, seen by both
    assert all(r[-1] == str((tmp_path / "runs").resolve()) for r in rows), out
    expected = ["loss scaler", "fused SGD", "collective errors", "bf16"]
    expected += ["torch_mlu line", "versions"] if device == "mlu" else []
    for check in expected:  # the device stack, one row each, all passing
        assert any(line.startswith(check + " ") and "  ok  " in line for line in out.splitlines()), (check, out)


@pytest.mark.skipif(NEWEST_LINE_IS_2_1, reason="needs a torch newer than the 2.1 line")
def test_doctor_on_an_mlu_with_torch_mlu_built_for_another_torch(tmp_path, monkeypatch):
    # torch_mlu built for torch 2.1 beside a newer torch: a pip install that pulled torch from the index.
    monkeypatch.setenv("EMULATED_TORCH_MLU_LINE", "2.1")
    proc = doctor(tmp_path, "mlu", setup(tmp_path, "mlu"))
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "versions           FAIL" in proc.stdout, proc.stdout
    fail = [line for line in proc.stdout.splitlines() if line.startswith("trainer doctor: FAIL:")][0]
    assert "is built for torch 2.1" in fail and "install the torch wheel Cambricon ships" in fail, fail
    assert "CNCL_ASYNC_ERROR_HANDLING=1" in proc.stdout  # the 2.1 line's own name, set by the trainer


@pytest.mark.parametrize("device", ["cpu", "mlu"])
def test_doctor_names_the_process_that_cannot_see_data_root(tmp_path, device):
    proc = doctor(tmp_path, device, setup(tmp_path, device), hide_root_from_rank=1)
    assert proc.returncode != 0, proc.stdout[-3000:]
    fails = [line for line in proc.stdout.splitlines() if line.startswith("trainer doctor: FAIL:")]
    assert fails and all(line == fails[0] for line in fails), proc.stdout
    assert (
        fails[0].startswith("trainer doctor: FAIL: process 1 (")
        and "data.root: " in fails[0]
        and "does not exist" in fails[0]
    ), fails[0]
    assert "trainer/doctor.py" not in proc.stdout + proc.stderr  # no traceback from the trainer's processes
