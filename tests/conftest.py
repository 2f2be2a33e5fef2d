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
