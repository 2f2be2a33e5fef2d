"""Shared fixtures; the factories themselves live in tests/helpers.py for other test files."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

# NOTE: before anything imports `datasets` or `huggingface_hub`, which read these once:
# tests never reach the hub, and their HF cache is private, not the user's.
_HF_HOME = tempfile.mkdtemp(prefix="trainer-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_HOME, "datasets")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from any test file

import pytest  # noqa: E402

import helpers  # noqa: E402

# What CI also runs on the floor stack (.ci/run: torch 2.1, every other direct dependency at
# its lowest allowed version; `pytest -m floor`): the emulated MLU on torch_mlu's oldest torch
# line, two emulated MLUs training fp16 over cncl, and the CPU path (config, optimizer, data
# readers, model, checkpoints, training) against the oldest timm, accelerate and datasets.
# A whole file, or one test of it (with all its parameters).
FLOOR_TESTS = (
    "tests/test_emulated_mlu.py",
    "tests/test_mlu_lines.py",
    "tests/test_mlu_e2e.py::test_env_reports_mlu_cncl_fp16_under_emulation",
    "tests/test_mlu_e2e.py::test_two_emulated_mlus_train_over_cncl_with_fp16",
    "tests/test_config.py",
    "tests/test_configs.py",
    "tests/test_optim.py",
    "tests/test_model.py",
    "tests/test_checkpoint.py",
    "tests/test_readers.py",
    "tests/test_train.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.nodeid == name or item.nodeid.startswith((name + "::", name + "[")) for name in FLOOR_TESTS):
            item.add_marker(pytest.mark.floor)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes, 6 train + 3 val JPEGs each, 40x30."""
    return helpers.make_image_folder(tmp_path / "imagenet")


@pytest.fixture(scope="session")
def hf_parquet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images as `image_folder`, as hub-layout parquet shards (train, validation)."""
    return helpers.make_hf_parquet(tmp_path_factory.mktemp("hf") / "parquet")


@pytest.fixture(scope="session")
def hf_saved_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images as `image_folder`, as a DatasetDict.save_to_disk directory."""
    return helpers.make_hf_saved(tmp_path_factory.mktemp("hf") / "saved")
