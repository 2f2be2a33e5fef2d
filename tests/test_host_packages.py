"""The device check on a host where nothing can be installed: benchmarks/host_packages.py says
what is missing, and the trainer imports and trains from a folder without `datasets`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import host_packages  # noqa: E402


def test_requirements_are_setup_cfg_lines():
    lines = host_packages.requirements()
    assert any(line.startswith("torch>=") for line in lines) and "simplejpeg>=1.7" in lines
    assert not any(line.startswith("#") for line in lines)


def test_an_absent_package_is_missing_with_what_it_costs(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "simplejpeg", None)
    found = host_packages.check(["datasets>=2.18", "simplejpeg>=1.7", "pyyaml>=5", "torch>=1.0"])
    assert set(found["missing"]) == {"datasets", "simplejpeg"}
    assert "HF sources" in found["missing"]["datasets"] and "PIL" in found["missing"]["simplejpeg"]
    assert found["too_old"] == {}


def test_a_package_below_its_floor_is_too_old():
    found = host_packages.check(["torch>=999"])
    assert list(found["too_old"]) == ["torch"] and "the trainer needs >=999" in found["too_old"]["torch"]


def test_fetch_list_never_asks_pip_for_torch_and_pins_the_installed_one(monkeypatch):
    lines = ["torch>=999", "torch_mlu>=1", "datasets>=2.18", "timm>=0"]
    monkeypatch.setattr(host_packages, "requirements", lambda: lines)
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert host_packages.to_fetch() == ["datasets>=2.18"]  # torch too old, torch_mlu absent: the vendor's to fix
    from importlib import metadata

    assert f"torch=={metadata.version('torch')}" in host_packages.pins()


BLOCK_DATASETS = "import sys; sys.modules['datasets'] = None; sys.modules['simplejpeg'] = None\n"


def test_the_trainer_imports_and_reads_folders_without_datasets(image_folder):
    # A fresh interpreter: in this one, other tests may have imported datasets already.
    script = (
        BLOCK_DATASETS
        + f"""
import importlib, pkgutil
from pathlib import Path
import trainer
for info in pkgutil.walk_packages(trainer.__path__, "trainer."):
    if not info.name.startswith("trainer.__main__"):
        importlib.import_module(info.name)
from trainer.data.readers import FolderReader, open_hf_split
from trainer.errors import DataError
assert len(FolderReader(Path({str(image_folder / "train")!r}))) == 18
try:
    open_hf_split({str(image_folder)!r}, "train")
except DataError as err:
    print("DataError:", err)
"""
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DataError: an HF source needs the `datasets` package" in proc.stdout and "pip install" in proc.stdout
