"""benchmarks/device_check.py end to end on the CPU with --tiny: every phase's code runs, so the
script a device rental depends on cannot rot between rentals. No figure is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_shell_wrapper_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "device_check.sh")]).returncode == 0


def test_tiny_device_check_writes_every_phase_and_survives_a_phase_that_runs_out_of_time(tmp_path):
    out = tmp_path / "dc"
    # Two CPU processes stand in for two devices; compile gets 2 s, which it cannot make.
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "device_check.py"),
        "--tiny",
        "--out",
        str(out),
        "--processes",
        "2",
        "--phase-limit",
        "compiled=2",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    assert report["env"]["device_type"] == "cpu" and report["data"]["train_images"] > 0
    phases = report["phases"]
    for name in ("fast", "recipe", "fast_all", "recipe_all"):
        assert phases[name]["status"] == "ok", (name, phases[name])
        figures = phases[name]["figures"]
        assert figures["model_step"]["img_per_s"] > 0 and figures["end_to_end"]["img_per_s"] > 0
        assert figures["end_to_end_vs_model_step"] > 0 and "peak_memory_bytes" in figures
        assert figures["precision"] == "fp32" and figures["processes"] == (2 if name.endswith("_all") else 1)
    assert phases["recipe"]["figures"]["setup"]["channels_last"] is False
    assert phases["fast"]["figures"]["setup"]["channels_last"] is True
    # A phase that fails or runs out of time is recorded; the report is still complete.
    assert phases["compiled"]["status"] == "timed out after 2 s" and "log_tail" in phases["compiled"]
    summary = report["summary"]
    assert set(summary["fast_all_scaling_efficiency"]) == {"model_step", "end_to_end"}
    assert summary["end_to_end_vs_model_step"] > 0 and "recipe_fp32_end_to_end_img_per_s" in summary
    table = (out / "table.txt").read_text()
    for line in (
        "fast ",
        "recipe ",
        "fast_all",
        "compiled    timed out",
        "scaling efficiency",
        "end to end / model step",
    ):
        assert line in table, (line, table)
    assert table in proc.stdout


def test_shell_wrapper_installs_nothing_from_an_index_and_runs_every_phase_without_datasets(tmp_path):
    # A lent machine: no index (PIP_NO_INDEX), no `datasets`, no `simplejpeg`, and a host Python
    # that is itself a venv (this one), whose packages the check's venv must still see.
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    absent = "import sys\nfor name in ('datasets', 'simplejpeg'):\n    sys.modules[name] = None\n"
    (blocker / "sitecustomize.py").write_text(absent)
    out, venv = tmp_path / "dc", tmp_path / "venv"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PYTHONPATH": str(blocker), "PYTHON": sys.executable}
    env["DEVICE_CHECK_VENV"] = str(venv)
    cmd = ["bash", str(REPO / "benchmarks" / "device_check.sh"), str(out), "--tiny", "--phase-limit", "compiled=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    install = json.loads((out / "install.json").read_text())
    log = (out / "install.log").read_text()
    assert install["status"] == "ok" and install["mode"] == "no-deps", (install, log[-3000:])
    assert install["index"] == "unreachable" and install["fetched"] == []
    assert any(pin.startswith("torch==") for pin in install["pinned"])
    # The project is installed in the check's venv, which imports it from this checkout.
    show = [str(venv / "bin" / "python"), "-c", "import trainer; print(trainer.__file__)"]
    where = subprocess.run(show, capture_output=True, text=True, cwd=tmp_path)
    assert where.stdout.strip() == str(REPO / "trainer" / "__init__.py"), where.stderr
    report = json.loads((out / "device_check.json").read_text())
    assert set(report["packages"]["missing"]) == {"datasets", "simplejpeg"}
    assert report["install"] == install and report["env"]["device_type"] == "cpu"
    for name in ("fast", "recipe"):
        assert report["phases"][name]["status"] == "ok", (name, report["phases"][name])
    assert "missing: datasets" in proc.stdout
