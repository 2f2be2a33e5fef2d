"""Tests for trainer.data.digits: the demo's built-in dataset, written once as an ImageNet folder."""

from __future__ import annotations

from collections import Counter

import pytest
from PIL import Image

from trainer.data.digits import CLASS_NAMES, IMAGE_SIZE_PX, write_digits
from trainer.data.readers import FolderReader


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("digits") / "digits")


def counts(root, split) -> Counter:
    return Counter({d.name: len(list(d.glob("*.JPEG"))) for d in (root / split).iterdir()})


def test_writes_all_1797_digits_as_jpegs_in_ten_classes(digits_root):
    train, val = counts(digits_root, "train"), counts(digits_root, "val")
    assert sorted(train) == sorted(val) == CLASS_NAMES
    assert sum(train.values()) + sum(val.values()) == 1797
    files = list(digits_root.rglob("*"))
    assert all(f.suffix == ".JPEG" for f in files if f.is_file())
    with Image.open(next(digits_root.rglob("*.JPEG"))) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (IMAGE_SIZE_PX, IMAGE_SIZE_PX)


def test_val_split_is_stratified(digits_root):
    from sklearn.datasets import load_digits

    per_class = Counter(load_digits().target.tolist())
    train, val = counts(digits_root, "train"), counts(digits_root, "val")
    for label, name in enumerate(CLASS_NAMES):
        assert train[name] + val[name] == per_class[label]
        assert val[name] == per_class[label] // 5  # every fifth image of each class
    assert 0.19 < sum(val.values()) / 1797 < 0.21


def test_train_and_val_hold_different_images(digits_root):
    train = {p.name for p in (digits_root / "train").rglob("*.JPEG")}
    val = {p.name for p in (digits_root / "val").rglob("*.JPEG")}
    assert train.isdisjoint(val) and len(train | val) == 1797


def test_folder_reader_reads_it_with_class_index_by_digit(digits_root):
    reader = FolderReader(digits_root / "train")
    assert reader.classes == CLASS_NAMES
    assert len(reader) + len(FolderReader(digits_root / "val", classes=reader.classes)) == 1797


def test_second_call_is_a_no_op(digits_root, monkeypatch):
    import sklearn.datasets

    def fail():
        raise AssertionError("write_digits loaded the digits again")

    monkeypatch.setattr(sklearn.datasets, "load_digits", fail)
    before = {p: p.stat().st_mtime_ns for p in digits_root.rglob("*")}
    assert write_digits(digits_root) == digits_root
    assert {p: p.stat().st_mtime_ns for p in digits_root.rglob("*")} == before


def test_no_temporary_folder_is_left_behind(digits_root):
    assert [p.name for p in digits_root.parent.iterdir()] == ["digits"]
