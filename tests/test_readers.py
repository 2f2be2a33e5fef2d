"""Tests for trainer.data.readers: the ImageNet folder and the HF sources behind one interface."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

import helpers
from trainer.config import DataConfig
from trainer.data.readers import (
    FOLDER_LAYOUT,
    HF_LAYOUT,
    DataError,
    FolderReader,
    HFReader,
    Reader,
    Sample,
    SpreadSubset,
    StreamReader,
)
from trainer.data.sources import create_reader, create_stream_reader


def folder_cfg(root: Path, **kwargs) -> DataConfig:
    return DataConfig(source="folder", root=str(root), **kwargs)


def hf_cfg(root: Path | str, **kwargs) -> DataConfig:
    return DataConfig(source="hf", root=str(root), **kwargs)


def all_samples(reader) -> list[Sample]:
    return [reader.read(i) for i in range(len(reader))]


# --- FolderReader -------------------------------------------------------------------------


def test_folder_reader_matches_torchvision_image_folder(tmp_path):
    from torchvision.datasets import ImageFolder

    # Names whose sorted order differs from the writing order, with upper and lower case.
    names = ["zebra", "Apple", "n01440764", "apple", "n01443537"]
    root = helpers.make_image_folder(tmp_path / "in", classes=5, train_per_class=2, val_per_class=1, names=names)
    reader = FolderReader(root / "train")
    reference = ImageFolder(str(root / "train"))
    assert reader.classes == reference.classes == sorted(names)
    assert {c: i for i, c in enumerate(reader.classes)} == reference.class_to_idx
    samples = all_samples(reader)
    assert [(s.name, s.label) for s in samples] == [(path, label) for path, label in reference.samples]
    assert samples[0].data == Path(reference.samples[0][0]).read_bytes()


def test_folder_reader_returns_raw_file_bytes_and_labels(image_folder):
    reader = create_reader(folder_cfg(image_folder), "train")
    assert isinstance(reader, Reader)
    assert len(reader) == 3 * 6
    samples = all_samples(reader)
    assert Counter(s.label for s in samples) == {0: 6, 1: 6, 2: 6}
    for s in samples:
        assert s.data == Path(s.name).read_bytes() and s.data[:2] == b"\xff\xd8"  # undecoded JPEG
        assert Path(s.name).parent.name == reader.classes[s.label]


def test_val_reader_uses_the_training_class_index(tmp_path):
    root = helpers.make_image_folder(tmp_path / "in", classes=3, train_per_class=2, val_per_class=1)
    for f in (root / "val" / "n00000000").iterdir():  # val lacks the first class: fine,
        f.unlink()
    (root / "val" / "n00000000").rmdir()
    train = create_reader(folder_cfg(root), "train")
    val = create_reader(folder_cfg(root), "val", classes=train.classes)
    assert val.classes == train.classes
    assert sorted({s.label for s in all_samples(val)}) == [1, 2]  # but labels keep the train index


def test_val_class_absent_from_train_is_a_data_error(image_folder):
    extra = image_folder / "val" / "n99999999"
    extra.mkdir()
    (extra / "x.JPEG").write_bytes(helpers.jpeg_bytes(0, 0))
    train = create_reader(folder_cfg(image_folder), "train")
    with pytest.raises(DataError, match="absent from the training split") as err:
        create_reader(folder_cfg(image_folder), "val", classes=train.classes)
    assert str(image_folder / "val") in str(err.value) and "n99999999" in str(err.value)


def test_empty_class_folder_is_a_data_error_naming_it(image_folder):
    (image_folder / "train" / "n00000077").mkdir()
    (image_folder / "train" / "n00000077" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="empty class folder") as err:
        create_reader(folder_cfg(image_folder), "train")
    assert str(image_folder / "train" / "n00000077") in str(err.value)


def test_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(DataError) as err:
        create_reader(folder_cfg(tmp_path / "nowhere"), "train")
    assert str(tmp_path / "nowhere") in str(err.value) and FOLDER_LAYOUT in str(err.value)
    assert "data.root" in str(err.value)


def test_missing_split_names_path_and_layout(image_folder):
    with pytest.raises(DataError) as err:
        create_reader(folder_cfg(image_folder), "validation")
    assert str(image_folder / "validation") in str(err.value) and FOLDER_LAYOUT in str(err.value)


def test_flat_split_without_class_folders_is_a_data_error(tmp_path):
    (tmp_path / "in" / "val").mkdir(parents=True)
    (tmp_path / "in" / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(helpers.jpeg_bytes(0, 0))
    with pytest.raises(DataError, match="no class folders") as err:
        FolderReader(tmp_path / "in" / "val")
    assert str(tmp_path / "in" / "val") in str(err.value)


def test_non_image_files_are_ignored(image_folder):
    folder = image_folder / "train" / "n00000001"
    for name in ("README.txt", "labels.csv", "Thumbs.db", ".DS_Store", "image.JPEG.part"):
        (folder / name).write_text("x")
    (folder / "upper.PNG").write_bytes(b"png-ish")  # extensions are matched case-insensitively
    (folder / "subdir.jpg").mkdir()  # a folder named like an image is not a file
    reader = FolderReader(image_folder / "train")
    names = [Path(s.name).name for s in all_samples(reader) if s.label == 1]
    assert names == sorted([f"{i:04d}.JPEG" for i in range(6)] + ["upper.PNG"])


# --- SpreadSubset -------------------------------------------------------------------------


def test_spread_subset_keeps_every_class(tmp_path):
    root = helpers.make_image_folder(tmp_path / "in", classes=5, train_per_class=4, val_per_class=1)
    reader = FolderReader(root / "train")
    subset = SpreadSubset.of(reader, 5)
    assert isinstance(subset, Reader) and len(subset) == 5 and subset.classes == reader.classes
    assert sorted(s.label for s in all_samples(subset)) == [0, 1, 2, 3, 4]
    # A plain prefix would have held a single class: the point of spreading.
    assert {reader.read(i).label for i in range(5)} != set(range(5))
    names = [s.name for s in all_samples(SpreadSubset.of(reader, 7))]
    assert len(set(names)) == 7


def test_spread_subset_of_zero_or_too_many_is_the_reader(image_folder):
    reader = FolderReader(image_folder / "train")
    assert SpreadSubset.of(reader, 0) is reader
    assert SpreadSubset.of(reader, len(reader)) is reader
    assert SpreadSubset.of(reader, len(reader) + 5) is reader


# --- HFReader -----------------------------------------------------------------------------


def assert_same_as_folder(hf_reader, folder_reader) -> None:
    assert hf_reader.classes == folder_reader.classes
    hf, folder = all_samples(hf_reader), all_samples(folder_reader)
    assert [(s.data, s.label) for s in hf] == [(s.data, s.label) for s in folder]


def test_hf_reader_over_parquet_shards(hf_parquet_dir, image_folder):
    reader = HFReader(str(hf_parquet_dir), "train")
    assert isinstance(reader, Reader)
    assert reader.classes == helpers.class_names(3)  # from the ClassLabel feature
    assert_same_as_folder(reader, FolderReader(image_folder / "train"))
    assert reader.read(4).name == "train[4]"
    val = HFReader(str(hf_parquet_dir), "validation", classes=reader.classes)
    assert_same_as_folder(val, FolderReader(image_folder / "val"))


def test_hf_reader_through_create_reader(hf_parquet_dir):
    reader = create_reader(hf_cfg(hf_parquet_dir), "validation")
    assert isinstance(reader, HFReader) and len(reader) == 9


def test_hf_reader_over_flat_parquet_files(tmp_path, hf_parquet_dir):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in (hf_parquet_dir / "data").iterdir():
        os.symlink(f, flat / f.name)
    assert len(HFReader(str(flat), "train")) == 18


def test_hf_reader_over_save_to_disk_dataset_dict(hf_saved_dir, image_folder):
    reader = HFReader(str(hf_saved_dir), "train")
    assert reader.classes == helpers.class_names(3)
    assert_same_as_folder(reader, FolderReader(image_folder / "train"))
    assert len(HFReader(str(hf_saved_dir), "validation")) == 9


def test_save_to_disk_single_dataset_is_refused_not_read_as_every_split(tmp_path):
    # A lone Dataset has no split names: reading it for train and val alike would
    # validate on the training images without a word.
    root = helpers.make_hf_saved(tmp_path / "one", single_split="train")
    assert (root / "state.json").is_file() and not (root / "dataset_dict.json").exists()
    with pytest.raises(DataError, match="single Dataset without splits") as err:
        HFReader(str(root), "train")
    assert str(root) in str(err.value)


def test_hf_reader_with_renamed_columns_and_splits(tmp_path, image_folder):
    root = helpers.make_hf_parquet(
        tmp_path / "renamed",
        image_column="img",
        label_column="target",
        train_split="training",
        val_split="holdout",
    )
    cfg = hf_cfg(root, image_column="img", label_column="target", train_split="training", val_split="holdout")
    reader = create_reader(cfg, cfg.train_split)
    assert_same_as_folder(reader, FolderReader(image_folder / "train"))
    assert len(create_reader(cfg, cfg.val_split)) == 9
    with pytest.raises(DataError, match="no column 'image'") as err:
        HFReader(str(root), "training")  # default column names do not exist here
    assert "data.image_column" in str(err.value) and "img" in str(err.value)


def test_hf_reader_with_plain_int_labels_numbers_the_classes(tmp_path):
    import datasets

    rows = helpers.split_rows(3, 2, (20, 20), 0)
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": data, "path": None} for _, _, data in rows],
            "label": [label for label, _, _ in rows],
        }
    ).cast_column("image", datasets.Image())
    (tmp_path / "ints" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "ints" / "data" / "train-00000-of-00001.parquet"))
    reader = HFReader(str(tmp_path / "ints"), "train")
    assert reader.classes == ["0", "1", "2"]
    assert [reader.read(i).label for i in range(len(reader))] == [0, 0, 1, 1, 2, 2]


def test_hf_row_without_image_has_no_data(tmp_path):
    import datasets

    ds = (
        datasets.Dataset.from_dict(
            {
                "image": [{"bytes": helpers.jpeg_bytes(0, 0), "path": None}, None],
                "label": [0, 1],
            }
        )
        .cast_column("image", datasets.Image())
        .cast_column("label", datasets.ClassLabel(names=["a", "b"]))
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "holes"))
    reader = HFReader(str(tmp_path / "holes"), "train")
    assert reader.read(0).data == helpers.jpeg_bytes(0, 0)
    assert reader.read(1) == Sample(None, 1, "train[1]")


@pytest.mark.parametrize("fixture", ["hf_parquet_dir", "hf_saved_dir"])
def test_hf_missing_split_is_a_data_error(request, fixture):
    root = request.getfixturevalue(fixture)
    with pytest.raises(DataError) as err:
        HFReader(str(root), "val")
    assert str(root) in str(err.value) and "'val'" in str(err.value)


def test_hf_path_that_is_not_a_dataset_is_a_data_error(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    for root in (tmp_path / "file.txt", tmp_path / "missing_dir", "./relative/missing"):
        with pytest.raises(DataError, match="not a dataset directory") as err:
            HFReader(str(root), "train")
        assert HF_LAYOUT in str(err.value)


def test_unknown_hub_id_offline_is_a_data_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        HFReader("no-such-user/no-such-dataset", "train")
    message = str(err.value)
    assert message.startswith("no-such-user/no-such-dataset (split 'train'): cannot open offline")
    assert HF_LAYOUT in message and "\n" not in message


# --- HFStreamReader -----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_thread_shutdown_sleep(monkeypatch):
    """`datasets` sleeps 5 s after each shuffled/interleaved parquet stream (an Arrow
    thread-shutdown workaround); a test's process outlives those threads anyway."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)  # absent before datasets 3


@pytest.mark.parametrize("shuffle", [False, True])
def test_stream_reader_ranks_are_disjoint_and_complete(hf_parquet_dir, shuffle):
    cfg = hf_cfg(hf_parquet_dir, streaming=True)
    ranks = [create_stream_reader(cfg, "train", rank=r, world_size=2, seed=3, shuffle=shuffle) for r in range(2)]
    assert all(isinstance(r, StreamReader) for r in ranks)
    assert ranks[0].classes == helpers.class_names(3)
    seen = [[(s.data, s.label) for s in r.iter_samples(epoch=0)] for r in ranks]
    everything = [(s.data, s.label) for s in all_samples(HFReader(str(hf_parquet_dir), "train"))]
    assert len(everything) == len(set(everything)) == 18  # every image is distinct
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(everything)
    assert len(seen[0]) == len(seen[1]) == 9


def test_stream_reader_shuffle_changes_with_epoch(hf_parquet_dir):
    reader = create_stream_reader(
        hf_cfg(hf_parquet_dir, streaming=True), "train", rank=0, world_size=1, seed=3, shuffle=True
    )
    epoch0 = [s.data for s in reader.iter_samples(0)]
    assert [s.data for s in reader.iter_samples(0)] == epoch0  # reproducible
    epoch1 = [s.data for s in reader.iter_samples(1)]
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)


def test_stream_reader_without_class_names(tmp_path, hf_parquet_dir):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(hf_parquet_dir / "data" / "train-*.parquet"), split="train")
    ds = ds.cast_column("label", datasets.Value("int64"))
    (tmp_path / "ints" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "ints" / "data" / "train-00000-of-00001.parquet"))
    cfg = hf_cfg(tmp_path / "ints", streaming=True)
    with pytest.raises(DataError, match="model.num_classes"):
        create_stream_reader(cfg, "train", rank=0, world_size=1, seed=0, shuffle=False)
    reader = create_stream_reader(cfg, "train", rank=0, world_size=1, seed=0, shuffle=False, num_classes=3)
    assert reader.classes == ["0", "1", "2"]
    assert Counter(s.label for s in reader.iter_samples(0)) == {0: 6, 1: 6, 2: 6}


def test_readers_are_checked_against_the_interface():
    class NotAReader:
        classes = ["a"]

    assert not isinstance(NotAReader(), Reader) and not isinstance(NotAReader(), StreamReader)
