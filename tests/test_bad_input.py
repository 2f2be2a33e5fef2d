"""Every bad-input kind through the real training CLI, plus `trainer check-data`.

One test per kind. A bad sample that cannot be used must be skipped by a run with
data.on_error=skip (listed in RUN_DIR/skipped.txt and counted in metrics.jsonl) and stop
a run with data.on_error=raise with one line naming it; an image that merely needs a
conversion must be decoded and trained on. All data is written here, tiny (32 px,
test_resnet), and shared by one skip run per source.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import ExifTags, Image

import helpers
from trainer.check_data import check_data_command
from trainer.config import load_config
from trainer.data.dataset import Skipped
from trainer.data.decode import DecodeError, inspect_image
from trainer.data.loader import create_loader

REPO = Path(__file__).resolve().parent.parent
BATCH = 4


# -- image bytes ----------------------------------------------------------------------
def encode(image: Image.Image, format_: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format_, **params)
    return buffer.getvalue()


def noise(seed: int, mode: str = "RGB") -> Image.Image:
    """A 40x40 noise image, so every file differs and JPEG truncation hits real data."""
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    return image.convert(mode)


def jpeg(seed: int) -> bytes:
    return encode(noise(seed), "JPEG", quality=90)


def truncated_jpeg(seed: int) -> bytes:
    """The first half of a JPEG: header intact, scan data cut off, as by an interrupted copy."""
    data = jpeg(seed)
    return data[: len(data) // 2]


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims width x height (no config knob lowers the pixel limit)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(bytes(25)))


def palette_with_alpha() -> bytes:
    image = noise(11).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def sixteen_bit_png() -> bytes:
    values = np.random.default_rng(12).integers(0, 65536, (40, 40), dtype=np.uint16)
    return encode(Image.fromarray(values), "PNG")  # mode I;16


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    return encode(noise(13), "JPEG", exif=exif.tobytes())


# kind -> (file under train/, its bytes, reason in skipped.txt)
FOLDER_SKIPPED = {
    "truncated_jpeg": ("a/truncated.JPEG", lambda: truncated_jpeg(1), "truncated JPEG"),
    "zero_byte_file": ("a/zero.JPEG", lambda: b"", "empty file"),
    "non_image_named_jpeg": ("b/error_page.JPEG", lambda: b"<html><body>404 Not Found</body></html>", "not an image"),
    "decompression_bomb": ("b/huge.png", lambda: png_claiming(20_000, 20_000), "decompression bomb"),
}
# kind -> (file under train/, its bytes, the conversion inspect_image names)
CONVERTED = {
    "png_named_jpeg": ("a/png.JPEG", lambda: encode(noise(14), "PNG"), "format PNG named .JPEG"),
    "cmyk_jpeg": ("a/cmyk.JPEG", lambda: encode(noise(15, "CMYK"), "JPEG"), "CMYK->RGB"),
    "grayscale_jpeg": ("a/gray.JPEG", lambda: encode(noise(16, "L"), "JPEG"), "L->RGB"),
    "palette_png_with_alpha": ("b/palette.png", palette_with_alpha, "palette+alpha->RGB"),
    "sixteen_bit_png": ("b/deep.png", sixteen_bit_png, "16-bit->8-bit"),
    "exif_rotated_jpeg": ("b/rotated.JPEG", exif_rotated, "EXIF rotation"),
}
# kind -> (train row, how the row is spoiled, reason in skipped.txt); parquet source
HF_SKIPPED = {
    "hf_missing_image": (3, {"image": None}, "row has no image"),
    "hf_undecodable_bytes": (6, {"image": {"bytes": b"\x00garbage, not an image", "path": "r6.jpg"}}, "not an image"),
    "hf_label_out_of_range": (9, {"label": 5}, "label 5 out of range [0, 2)"),
}
FOLDER_TRAIN_SIZE, HF_TRAIN_SIZE = 24, 12  # multiples of BATCH: drop_last never hides a bad file


# -- datasets and runs ----------------------------------------------------------------
def write_folder(root: Path, train_files: dict[str, bytes], train_size: int, val_per_class: int = 1) -> Path:
    """ImageNet layout with classes a and b; clean JPEGs fill train/ up to `train_size`."""
    clean = train_size - len(train_files)
    files = {f"train/{'ab'[i % 2]}/clean{i}.JPEG": jpeg(100 + i) for i in range(clean)}
    files |= {f"train/{name}": data for name, data in train_files.items()}
    files |= {f"val/{c}/val{i}.JPEG": jpeg(200 + i) for c in "ab" for i in range(val_per_class)}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_parquet(
    root: Path, spoiled: dict[int, dict], train_size: int = HF_TRAIN_SIZE, class_names: bool = True
) -> Path:
    """data/{train,validation}-*.parquet with HF's Image struct; ClassLabel names a, b unless told."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {
        "image": {"_type": "Image"},
        "label": {"names": ["a", "b"], "_type": "ClassLabel"} if class_names else {"dtype": "int64", "_type": "Value"},
    }
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, size in (("train", train_size), ("validation", 4)):
        rows = [{"image": {"bytes": jpeg(300 + i), "path": f"r{i}.jpg"}, "label": i % 2} for i in range(size)]
        for index, change in spoiled.items() if split == "train" else ():
            rows[index].update(change)
        table = pa.table(
            {
                "image": pa.array([r["image"] for r in rows], image_type),
                "label": pa.array([r["label"] for r in rows], pa.int64()),
            }
        )
        metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
        pq.write_table(table.replace_schema_metadata(metadata), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def write_config(tmp: Path, root: Path, source: str = "folder") -> Path:
    config = {
        "model": {"name": "test_resnet"},
        "data": {
            "source": source,
            "root": str(root),
            "val_split": "val" if source == "folder" else "validation",
            "hf_cache_dir": str(tmp / "hf_cache"),
        },
        "loader": {"batch_size_per_device": BATCH, "workers": 0},
        "input": {"img_size": 32},
        "train": {"epochs": 1, "precision": "fp32", "channels_last": False, "seed": 0},
        "output": {"dir": str(tmp / "runs"), "run_name": "run", "progress": "log", "plots": False},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(command: str, config: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(config.parent / "hf_home")}
    return subprocess.run(
        [sys.executable, "-m", "trainer", command, "--config", str(config), *overrides],
        capture_output=True,
        text=True,
        env=env,
        cwd=config.parent,
        timeout=300,
    )


class SkipRun:
    """One finished training run with data.on_error=skip."""

    def __init__(self, tmp: Path, root: Path, source: str) -> None:
        self.result = run_cli("train", write_config(tmp, root, source))
        assert self.result.returncode == 0, self.result.stderr[-3000:]
        run_dir = tmp / "runs" / "run"
        lines = (run_dir / "skipped.txt").read_text().splitlines() if (run_dir / "skipped.txt").exists() else []
        self.skipped = dict(line.split("\t", 1) for line in lines)
        self.record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> SkipRun:
    tmp = tmp_path_factory.mktemp("folder")
    files = {name: make() for name, make, _ in (*FOLDER_SKIPPED.values(), *CONVERTED.values())}
    return SkipRun(tmp, write_folder(tmp / "data", files, FOLDER_TRAIN_SIZE), "folder")


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> SkipRun:
    tmp = tmp_path_factory.mktemp("hf")
    spoiled = {index: change for index, change, _ in HF_SKIPPED.values()}
    return SkipRun(tmp, write_parquet(tmp / "data", spoiled), "hf")


def raise_in_loader(tmp: Path, root: Path, source: str, workers: int) -> str:
    """Iterate the training loader with on_error=raise; the message of the error it raises."""
    cfg = load_config(
        write_config(tmp, root, source),
        ["data.on_error=raise", f"loader.workers={workers}", "loader.persistent_workers=false"],
    )
    datasets = helpers.create_datasets_for(cfg)
    loader = create_loader(datasets.train, cfg.loader, batch_size=BATCH, pin_kwargs={}, sampler=datasets.train_sampler)
    with pytest.raises(DecodeError) as caught:
        for _ in loader:
            pass
    return str(caught.value)


# -- one test per bad-input kind ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", FOLDER_SKIPPED)
def test_bad_file_is_skipped_or_fatal_with_raise(kind: str, folder_run: SkipRun, tmp_path: Path) -> None:
    name, make, reason = FOLDER_SKIPPED[kind]
    matches = {n: r for n, r in folder_run.skipped.items() if n.endswith(f"train/{name}")}
    assert len(matches) == 1 and next(iter(matches.values())).startswith(reason), folder_run.skipped
    assert folder_run.record["skipped"] == len(FOLDER_SKIPPED) == len(folder_run.skipped)
    assert folder_run.record["train_samples"] == FOLDER_TRAIN_SIZE - len(FOLDER_SKIPPED)
    # on_error=raise, in a worker process: the DataLoader re-raises a worker's error anew.
    root = write_folder(tmp_path / "data", {name: make()}, BATCH)
    message = raise_in_loader(tmp_path, root, "folder", workers=1)
    assert message.startswith(f"{root / 'train' / name}: {reason}") and "\n" not in message, message


@pytest.mark.slow
@pytest.mark.parametrize("kind", HF_SKIPPED)
def test_bad_row_is_skipped_or_fatal_with_raise(kind: str, hf_run: SkipRun, tmp_path: Path) -> None:
    index, change, reason = HF_SKIPPED[kind]
    assert hf_run.skipped.get(f"train[{index}]", "").startswith(reason), hf_run.skipped
    assert hf_run.record["skipped"] == len(HF_SKIPPED) == len(hf_run.skipped)
    assert hf_run.record["train_samples"] == HF_TRAIN_SIZE - len(HF_SKIPPED)
    message = raise_in_loader(tmp_path, write_parquet(tmp_path / "data", {index: change}), "hf", workers=0)
    assert message.startswith(f"train[{index}]: {reason}") and "\n" not in message, message


@pytest.mark.slow
@pytest.mark.parametrize(("source", "workers"), [("folder", 1), ("hf", 0)])
def test_on_error_raise_stops_the_cli_with_one_line(source: str, workers: int, tmp_path: Path) -> None:
    if source == "folder":
        root, expected = write_folder(tmp_path / "data", {"b/zero.JPEG": b""}, 2 * BATCH), "b/zero.JPEG: empty file"
    else:
        root, expected = write_parquet(tmp_path / "data", {6: {"image": None}}), "train[6]: row has no image"
    result = run_cli("train", write_config(tmp_path, root, source), "data.on_error=raise", f"loader.workers={workers}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("trainer: error:")]
    assert len(errors) == 1 and errors[0].endswith(expected), result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("kind", CONVERTED)
def test_image_needing_conversion_is_decoded_not_skipped(kind: str, folder_run: SkipRun, tmp_path: Path) -> None:
    name, make, conversion = CONVERTED[kind]
    data = make()
    assert conversion in inspect_image(data, name).conversions  # the file is the kind it claims
    assert not [n for n in folder_run.skipped if n.endswith(name)]
    assert folder_run.record["train_samples"] == FOLDER_TRAIN_SIZE - len(FOLDER_SKIPPED)
    # Through the training pipeline: a 3x32x32 uint8 crop like any other image.
    root = write_folder(tmp_path / "data", {name: data}, 3)
    cfg = load_config(write_config(tmp_path, root))
    train = helpers.create_datasets_for(cfg).train
    index = next(i for i in range(len(train)) if train.reader.read(i).name.endswith(name))
    item = train[(0, index)]
    assert not isinstance(item, Skipped), item
    assert tuple(item[0].shape) == (3, 32, 32) and item[0].dtype == torch.uint8


def test_real_image_over_the_pixel_limit_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No config knob lowers the limit, so PIL's own is lowered: a real 40x40 JPEG becomes a bomb.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40 // 4)
    cfg = load_config(write_config(tmp_path, write_folder(tmp_path / "data", {}, 2)))
    item = helpers.create_datasets_for(cfg).train[(0, 0)]
    assert isinstance(item, Skipped) and item.reason.startswith("decompression bomb"), item


def test_hf_missing_label_without_class_names_is_skipped(tmp_path: Path) -> None:
    # Plain int64 labels (no ClassLabel): the class count comes from the labels, which must
    # tolerate a null; the row is then skipped like any label out of range.
    root = write_parquet(tmp_path / "data", {2: {"label": None}}, train_size=4, class_names=False)
    cfg = load_config(write_config(tmp_path, root, "hf"))
    datasets = helpers.create_datasets_for(cfg)
    assert datasets.classes == ["0", "1"]
    item = datasets.train[(0, 2)]
    assert isinstance(item, Skipped) and item.reason == "label -1 out of range [0, 2)", item


def test_label_beyond_model_num_classes_is_skipped(tmp_path: Path) -> None:
    root = write_parquet(tmp_path / "data", {3: {"label": 5}}, train_size=4, class_names=False)
    cfg = load_config(write_config(tmp_path, root, "hf"), ["model.num_classes=2"])
    train = helpers.create_datasets_for(cfg, cfg.model.num_classes).train
    item = train[(0, 3)]
    assert isinstance(item, Skipped) and "out of range" in item.reason, item


# -- check-data -----------------------------------------------------------------------
def test_check_data_reports_counts_examples_and_exits_1(tmp_path: Path) -> None:
    root = write_folder(
        tmp_path / "data",
        {
            "a/cut1.JPEG": truncated_jpeg(1),
            "a/cut2.JPEG": truncated_jpeg(2),
            "a/zero.JPEG": b"",
            "b/page.JPEG": b"<html></html>",
            "b/cmyk.JPEG": encode(noise(3, "CMYK"), "JPEG"),
            "b/png.JPEG": encode(noise(4), "PNG"),
        },
        10,
    )
    (root / "train" / "c").mkdir()  # empty class folder: training would stop at it
    (root / "val" / "d").mkdir()
    (root / "val" / "d" / "x.JPEG").write_bytes(jpeg(5))  # a val class absent from train
    result = run_cli("check-data", write_config(tmp_path, root), "--examples", "1")
    out = result.stdout
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    assert "train 10 of 10, val 3 of 3 images" in out
    assert "unreadable files: 4\n  truncated JPEG: 2\n    " in out
    assert out.count("/cut") == 1  # --examples 1: one example per kind
    assert "  empty file: 1\n" in out and "  not an image: 1\n" in out
    assert "class mismatches: 1\n  val classes absent from train: 1\n    d\n" in out
    assert "empty classes: 1\n" in out and "train/c" in out
    assert "label problems: 0" in out
    assert "  CMYK->RGB: 1\n" in out and "  format PNG named .JPEG: 1\n" in out
    assert "result: problems found" in out


def test_check_data_clean_folder_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_folder(tmp_path / "data", {"a/gray.JPEG": encode(noise(1, "L"), "JPEG")}, 6)
    cfg = load_config(write_config(tmp_path, root))
    assert check_data_command(cfg, Namespace(limit=0, examples=5)) == 0
    out = capsys.readouterr().out
    assert "unreadable files: 0" in out and "L->RGB: 1" in out and "result: ok" in out


@pytest.mark.slow
def test_check_data_hf_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spoiled = {index: change for index, change, _ in HF_SKIPPED.values()} | {10: {"label": None}}
    config = write_config(tmp_path, write_parquet(tmp_path / "data", spoiled), "hf")
    for workers in (0, 2):  # in this process, then in worker processes (pickled readers, from the fork server)
        assert (
            check_data_command(load_config(config, [f"loader.workers={workers}"]), Namespace(limit=0, examples=5)) == 1
        )
        out = capsys.readouterr().out
        assert (
            "unreadable files: 2\n" in out and "train[3]: row has no image" in out and "train[6]: not an image" in out
        )
        assert (
            "label problems: 2\n" in out
            and "train[9]: label 5" in out
            and "label missing (-1): 1\n    train[10]" in out
        )
        assert "class mismatches: 0" in out


def test_check_data_limit_with_worker_processes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_folder(tmp_path / "data", {"b/zero.JPEG": b""}, 8)
    cfg = load_config(write_config(tmp_path, root), ["loader.workers=2"])
    assert check_data_command(cfg, Namespace(limit=3, examples=5)) == 0  # zero.JPEG sorts last in b/
    assert "train 3 of 8, val 2 of 2 images" in capsys.readouterr().out
    assert check_data_command(cfg, Namespace(limit=0, examples=5)) == 1
    assert "b/zero.JPEG: empty file" in capsys.readouterr().out
