"""Tests for trainer.data.flat_val: ImageNet's flat val/*.JPEG with a labels file."""

from __future__ import annotations

from pathlib import Path

import pytest

import helpers
from trainer.config import DataConfig
from trainer.data.flat_val import FlatValReader, read_labels
from trainer.data.readers import DataError
from trainer.data.sources import create_reader


def make_flat(root: Path, per_class: int = 2, labels: str = "kaggle") -> tuple[Path, dict[str, str]]:
    """A train/ of class folders and a flat val/ of ILSVRC-named JPEGs; returns (root, stem -> class)."""
    helpers.make_image_folder(root, classes=3, train_per_class=2, val_per_class=0)
    (root / "val").mkdir(exist_ok=True)
    names = helpers.class_names(3)
    truth = {}
    for n in range(3 * per_class):
        stem = f"ILSVRC2012_val_{n + 1:08d}"
        label = (n * 2) % 3
        (root / "val" / f"{stem}.JPEG").write_bytes(helpers.jpeg_bytes(label, 1000 + n))
        truth[stem] = names[label]
    if labels == "kaggle":
        rows = [f"{stem},{cls} 10 20 30 40 {cls} 1 2 3 4" for stem, cls in truth.items()]
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    else:
        (root / "val_labels.csv").write_text("".join(f"{stem}.JPEG,{cls}\n" for stem, cls in truth.items()))
    return root, truth


def check(reader, truth: dict[str, str]) -> None:
    assert len(reader) == len(truth)
    for i in range(len(reader)):
        sample = reader.read(i)
        assert reader.classes[sample.label] == truth[Path(sample.name).stem]


@pytest.mark.parametrize("labels", ["kaggle", "plain"])
def test_flat_val_is_found_and_labelled_by_either_format(tmp_path, labels):
    root, truth = make_flat(tmp_path / "imagenet", labels=labels)
    cfg = DataConfig(root=str(root))
    train = create_reader(cfg, "train")
    val = create_reader(cfg, "val", classes=train.classes)
    assert isinstance(val, FlatValReader)
    check(val, truth)


def test_plain_csv_with_a_header_named_by_data_val_labels(tmp_path):
    root, truth = make_flat(tmp_path / "imagenet", labels="plain")
    labels = tmp_path / "elsewhere.csv"
    labels.write_text("file,class\n" + (root / "val_labels.csv").read_text())
    (root / "val_labels.csv").unlink()
    train = create_reader(DataConfig(root=str(root)), "train")
    check(create_reader(DataConfig(root=str(root), val_labels=str(labels)), "val", classes=train.classes), truth)


def test_images_without_labels_and_labels_without_images_are_one_line_with_counts(tmp_path):
    root, truth = make_flat(tmp_path / "imagenet")
    (root / "val" / "ILSVRC2012_val_00000001.JPEG").unlink()
    (root / "val" / "stray.JPEG").write_bytes(helpers.jpeg_bytes(0, 5))
    train = create_reader(DataConfig(root=str(root)), "train")
    with pytest.raises(DataError) as err:
        create_reader(DataConfig(root=str(root)), "val", classes=train.classes)
    message = str(err.value)
    assert "\n" not in message
    assert "1 of 6 images have no label" in message and "1 of its 6 labels have no image" in message
    assert "unlabelled stray.JPEG" in message and "no image for ILSVRC2012_val_00000001" in message


def test_only_labels_without_images(tmp_path):
    root, _ = make_flat(tmp_path / "imagenet")
    (root / "val" / "ILSVRC2012_val_00000002.JPEG").unlink()
    train = create_reader(DataConfig(root=str(root)), "train")
    with pytest.raises(
        DataError,
        match=r"0 of 5 images have no label .* and 1 of its 6 labels have no "
        r"image \(e.g. no image for ILSVRC2012_val_00000002\)",
    ):
        create_reader(DataConfig(root=str(root)), "val", classes=train.classes)


def test_unknown_class_missing_labels_file_and_bad_row(tmp_path):
    root, _ = make_flat(tmp_path / "imagenet", labels="plain")
    train = create_reader(DataConfig(root=str(root)), "train")
    labels = root / "val_labels.csv"
    labels.write_text(labels.read_text().replace("n00000001", "n99999999"))
    with pytest.raises(DataError, match=r"classes absent from the training split, e.g. n99999999"):
        create_reader(DataConfig(root=str(root)), "val", classes=train.classes)
    labels.write_text("ILSVRC2012_val_00000001.JPEG\n")
    with pytest.raises(DataError, match=r"val_labels.csv line 1: expected file,class"):
        create_reader(DataConfig(root=str(root)), "val", classes=train.classes)
    labels.unlink()
    with pytest.raises(DataError, match=r"no labels file .*set data.val_labels"):
        create_reader(DataConfig(root=str(root)), "val", classes=train.classes)


def test_conflicting_labels_for_one_file(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("a.JPEG,n1\na,n2\n")
    with pytest.raises(DataError, match=r"line 2: a labelled both n1 and n2"):
        read_labels(path)


def test_check_data_reads_a_flat_val(tmp_path, capsys):
    from trainer.__main__ import main

    root, _ = make_flat(tmp_path / "imagenet")
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{root: {root}}}\nloader: {{workers: 0}}\n")
    assert main(["check-data", "--config", str(config)]) == 0
    assert "val 6 of 6 images" in capsys.readouterr().out
