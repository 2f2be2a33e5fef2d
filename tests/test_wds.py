"""Tests for trainer.data.wds and trainer convert: tar shards read by index or streamed."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

import helpers
from trainer.config import DataConfig
from trainer.data.readers import DataError, Reader, StreamReader
from trainer.data.sources import create_reader
from trainer.data.wds import TarShardReader, TarShardStream


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_shards(
    root: Path, samples: int, per_shard: int, split: str = "train", classes: int = 3
) -> list[tuple[str, int]]:
    """timm-layout shards of `samples` tiny JPEGs; returns [(key, label)] in shard order."""
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for shard in range(-(-samples // per_shard)):
        members = []
        for i in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
            key, label = f"s{i:05d}", i % classes
            members += [(f"{key}.jpg", helpers.jpeg_bytes(label, i)), (f"{key}.cls", f"{label}\n".encode())]
            written.append((key, label))
        write_shard(root / f"imagenet1k-{split}-{shard:04d}.tar", members)
    return written


def key_of(name: str) -> str:
    return name.rsplit(":", 1)[1]


def test_reader_reads_every_sample_by_index_and_caches_the_index(tmp_path):
    written = make_shards(tmp_path / "wds", samples=10, per_shard=4)
    reader = create_reader(DataConfig(source="wds", root=str(tmp_path / "wds")), "train")
    assert isinstance(reader, Reader) and isinstance(reader, TarShardReader)
    assert [(key_of(s.name), s.label) for s in (reader.read(i) for i in range(len(reader)))] == written
    assert reader.read(3).data == helpers.jpeg_bytes(0, 3) and reader.classes == ["0", "1", "2"]
    assert reader.cache_file == tmp_path / "wds" / ".trainer-index-wds-train.bin"
    import pickle

    copy = pickle.loads(pickle.dumps(reader))  # as a spawned loader worker gets it
    assert copy.read(9).data == reader.read(9).data


def test_bad_samples_are_read_as_skippable_and_named(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    good = helpers.jpeg_bytes(1, 1)
    write_shard(
        root / "x-train-0000.tar",
        [
            ("a.jpg", good),
            ("a.cls", b"1"),
            ("b.cls", b"2"),
            ("c.jpg", good),
            ("c.cls", b"cat"),
            ("d.jpg", b"not a jpeg"),
            ("d.cls", b"0"),
        ],
    )
    reader = TarShardReader(root, "train")
    samples = [reader.read(i) for i in range(len(reader))]
    assert [(key_of(s.name), s.data is not None, s.label) for s in samples] == [
        ("a", True, 1),
        ("b", False, 2),
        ("c", True, -1),
        ("d", True, 0),
    ]
    assert samples[0].name == f"{root / 'x-train-0000.tar'}:a"
    # The dataset skips them with a reason, as for any source.
    from timm.data import create_transform

    from trainer.data.dataset import ImageDataset, Skipped, _SampleDecoder

    ds = ImageDataset(
        reader, _SampleDecoder(create_transform(16, is_training=False, use_prefetcher=True), 3, None, "skip", 0)
    )
    reasons = [ds[i].reason for i in range(4) if isinstance(ds[i], Skipped)]
    assert len(reasons) == 3 and "row has no image" in reasons[0] and "label -1 out of range" in reasons[1]


def test_missing_and_broken_shards_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"no tar shards for split 'train'"):
        TarShardReader(tmp_path, "train")
    (tmp_path / "x-train-0000.tar").write_bytes(b"\0" * 100 + b"junk" * 300)
    with pytest.raises(DataError, match=r"x-train-0000.tar: not a readable tar shard"):
        TarShardReader(tmp_path, "train")


class _Names(torch.utils.data.IterableDataset):
    def __init__(self, reader: TarShardStream, epoch: int) -> None:
        self.reader, self.epoch = reader, epoch

    def __iter__(self):
        return (key_of(s.name) for s in self.reader.iter_samples(self.epoch))


def stream_keys(root: Path, rank: int, world: int, workers: int, epoch: int, shuffle: bool = True) -> list[str]:
    reader = TarShardStream(root, "train", rank, world, seed=5, shuffle=shuffle, num_classes=3)
    assert isinstance(reader, StreamReader)
    loader = torch.utils.data.DataLoader(_Names(reader, epoch), batch_size=None, num_workers=workers)
    return list(loader)


def write_info(root: Path, per_shard: list[int]) -> None:
    names = sorted(p.name for p in root.glob("*-train-*.tar"))
    (root / "_info.json").write_text(
        json.dumps(
            {"splits": {"train": {"num_samples": sum(per_shard), "filenames": names, "shard_lengths": per_shard}}}
        )
    )


# 12 shards: enough to deal out whole; 2: fewer than the consumers; with sizes: balanced ranges.
@pytest.mark.parametrize("shards, sizes", [(12, False), (2, False), (5, True)])
def test_streamed_shards_give_every_sample_once_per_epoch_on_1_2_3_processes(tmp_path, shards, sizes):
    per_shard = -(-37 // shards)
    written = make_shards(tmp_path / "wds", samples=37, per_shard=per_shard)
    if sizes:
        write_info(tmp_path / "wds", [per_shard] * (shards - 1) + [37 - per_shard * (shards - 1)])
    everything = sorted(key for key, _ in written)
    for world in (1, 2, 3):
        epochs = []
        for epoch in (0, 1):
            per_rank = [stream_keys(tmp_path / "wds", rank, world, workers=2, epoch=epoch) for rank in range(world)]
            keys = [k for rank_keys in per_rank for k in rank_keys]
            assert sorted(keys) == everything, (world, epoch)
            if sizes:  # 2 workers per process: at most 2 samples apart
                assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 2
            epochs.append(keys)
        assert epochs[0] != epochs[1]  # reshuffled each epoch
    # The same (seed, epoch, rank, worker) replays the same order: resuming by replay is exact.
    assert stream_keys(tmp_path / "wds", 1, 2, 2, 0) == stream_keys(tmp_path / "wds", 1, 2, 2, 0)


def test_convert_folder_to_wds_and_parquet_holds_the_same_samples(tmp_path, capsys):
    from trainer.__main__ import main

    root = helpers.make_image_folder(tmp_path / "imagenet", classes=3, train_per_class=5, val_per_class=2)
    (root / "train" / "n00000001" / "broken.JPEG").write_bytes(b"")  # read fine, copied as is
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{root: {root}}}\n")
    assert main(["convert", "--config", str(config), "--to", "wds", str(tmp_path / "wds"), "--shard-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "data.source=wds" in out
    info = json.loads((tmp_path / "wds" / "_info.json").read_text())
    assert info["classes"] == helpers.class_names(3)
    assert info["splits"]["train"]["num_samples"] == 16 and info["splits"]["train"]["shard_lengths"] == [4, 4, 4, 4]
    assert info["splits"]["validation"]["num_samples"] == 6
    folder = create_reader(DataConfig(root=str(root)), "train")
    shards = create_reader(DataConfig(source="wds", root=str(tmp_path / "wds")), "train")
    assert shards.classes == folder.classes
    as_pairs = lambda r: Counter((r.read(i).data, r.classes[r.read(i).label]) for i in range(len(r)))  # noqa: E731
    assert as_pairs(shards) == as_pairs(folder)
    labels = [shards.read(i).label for i in range(4)]
    assert len(set(labels)) > 1  # the training split is shuffled across shards

    assert (
        main(["convert", "--config", str(config), "--to", "parquet", str(tmp_path / "pq"), "--shard-size", "10"]) == 0
    )
    parquet = create_reader(DataConfig(source="hf", root=str(tmp_path / "pq")), "train")
    assert parquet.classes == folder.classes and as_pairs(parquet) == as_pairs(folder)
    assert main(["convert", "--config", str(config), "--to", "wds", str(tmp_path / "wds")]) == 2  # not empty: one line
    assert "output directory is not empty" in capsys.readouterr().err


def test_sizes_file_that_disagrees_with_a_shard_is_one_line(tmp_path):
    make_shards(tmp_path / "wds", samples=6, per_shard=3)
    write_info(tmp_path / "wds", [3, 4])
    with pytest.raises(DataError, match=r"imagenet1k-train-0001.tar: 3 samples, but .*_info.json says 4"):
        stream_keys(tmp_path / "wds", 0, 1, 0, 0, shuffle=False)
