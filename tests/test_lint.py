"""The code is clean under ruff (configured in pyproject.toml): lint rules and formatting."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PATHS = ["trainer", "tests", "benchmarks"]


def ruff() -> str:
    found = Path(sys.executable).with_name("ruff")
    path = str(found) if found.is_file() else shutil.which("ruff")
    if path is None:
        pytest.skip("ruff is not installed (pip install ruff)")
    return path


def test_ruff_check_is_clean():
    proc = subprocess.run(
        [ruff(), "check", "--output-format", "concise", *PATHS], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


def test_ruff_format_is_clean():
    proc = subprocess.run([ruff(), "format", "--check", *PATHS], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
