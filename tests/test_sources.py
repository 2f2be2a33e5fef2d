"""Tests for trainer.data.sources: the registry that picks a reader by `data.source`."""

from __future__ import annotations

import pytest

import helpers
from trainer.config import DataConfig
from trainer.data.readers import FolderReader, HFReader
from trainer.data.sources import SOURCES, Source, class_names, create_reader, create_stream_reader, get_source
from trainer.errors import DataError


def test_each_source_owns_its_val_split_default():
    assert get_source("folder").val_split(DataConfig()) == "val"
    assert get_source("hf").val_split(DataConfig(source="hf")) == "validation"
    assert get_source("hf").val_split(DataConfig(source="hf", val_split="test")) == "test"


def test_unknown_source_is_one_line_naming_the_registered_ones():
    with pytest.raises(DataError) as err:
        create_reader(DataConfig(source="tfds", root="x"), "train")
    assert str(err.value) == "data.source: unknown source 'tfds' (registered: folder, hf, wds)"


def test_every_config_choice_is_registered_and_back():
    from dataclasses import fields

    choices = next(f for f in fields(DataConfig) if f.name == "source").metadata["choices"]
    assert set(choices) == set(SOURCES)
    assert all(isinstance(s, Source) and s.name == name for name, s in SOURCES.items())


def test_readers_are_picked_by_name(image_folder, hf_parquet_dir):
    assert isinstance(create_reader(DataConfig(root=str(image_folder)), "train"), FolderReader)
    assert isinstance(create_reader(DataConfig(source="hf", root=str(hf_parquet_dir)), "train"), HFReader)


def test_a_folder_does_not_stream(image_folder):
    with pytest.raises(DataError, match="the folder source does not stream"):
        create_stream_reader(DataConfig(root=str(image_folder)), "train", 0, 1, 0, shuffle=False)


def test_class_names_without_a_scan(tmp_path, hf_parquet_dir, hf_saved_dir):
    root = helpers.make_image_folder(tmp_path / "data", classes=3)
    assert class_names(DataConfig(root=str(root))) == helpers.class_names(3)
    # an HF dataset's ClassLabel names, read from its features
    for hf_root in (hf_parquet_dir, hf_saved_dir):
        assert class_names(DataConfig(source="hf", root=str(hf_root))) == helpers.class_names(3)


def test_class_names_absent_are_none(tmp_path, hf_parquet_dir):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(hf_parquet_dir / "data" / "train-*.parquet"), split="train")
    (tmp_path / "ints" / "data").mkdir(parents=True)
    ds = ds.cast_column("label", datasets.Value("int64"))
    ds.to_parquet(str(tmp_path / "ints" / "data" / "train-00000-of-00001.parquet"))
    assert class_names(DataConfig(source="hf", root=str(tmp_path / "ints"))) is None  # the reader counts int labels
    (tmp_path / "shards").mkdir()
    assert class_names(DataConfig(source="wds", root=str(tmp_path / "shards"))) is None  # no _info.json
    (tmp_path / "shards" / "_info.json").write_text('{"classes": ["cat", "dog"]}')
    assert class_names(DataConfig(source="wds", root=str(tmp_path / "shards"))) == ["cat", "dog"]
