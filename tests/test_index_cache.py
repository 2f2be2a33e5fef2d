"""Tests for trainer.data.index_cache and folder_index: one scan per job, shared through a file."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import helpers
from trainer.data import folder_index, index_cache
from trainer.data.readers import DataError, FolderReader

REPO = Path(__file__).resolve().parent.parent

# Index a split as process RANK would, counting the class-folder scans it does itself.
PROBE = """
import json, sys
from pathlib import Path
from trainer.data import folder_index
scans = []
real = folder_index.scan
folder_index.scan = lambda *a: scans.append(1) or real(*a)
from trainer.data.readers import FolderReader
reader = FolderReader(Path(sys.argv[1]), index_cache=sys.argv[2], rank=int(sys.argv[3]), index_wait_s=60)
print(json.dumps({"scans": len(scans), "n": len(reader), "labels": [int(l) for l in reader._labels],
                  "mapped": type(reader._paths).__name__ == "memmap", "file": str(reader.cache_file)}))
"""


def probe(split_dir: Path, cache: str, rank: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", PROBE, str(split_dir), cache, str(rank)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_index_is_built_once_by_process_0_and_reused_by_another_process_and_a_later_run(tmp_path):
    root = helpers.make_image_folder(tmp_path / "data", classes=3, train_per_class=5)
    cache = tmp_path / "cache"
    waiting = probe(root / "train", str(cache), rank=1)  # started first: it must wait, not scan
    time.sleep(0.5)
    builder = result(probe(root / "train", str(cache), rank=0))
    other = result(waiting)
    assert builder["scans"] == 1 and other["scans"] == 0
    assert other["mapped"] and other["n"] == builder["n"] == 15 and other["labels"] == builder["labels"]
    later = result(probe(root / "train", str(cache), rank=0))
    assert later["scans"] == 0 and later["mapped"] and later["file"] == builder["file"]
    assert len(list(cache.iterdir())) == 1


def test_default_location_is_beside_the_data_and_matches_a_fresh_scan(tmp_path):
    root = helpers.make_image_folder(tmp_path / "data", classes=4, train_per_class=3, names=["b", "a", "D", "c"])
    first = FolderReader(root / "train", index_cache="")
    assert first.cache_file == root / ".trainer-index-train.bin"
    again = FolderReader(root / "train", index_cache="")
    uncached = FolderReader(root / "train")
    assert again.classes == uncached.classes == sorted(["b", "a", "D", "c"])
    assert [again.read(i) for i in range(len(again))] == [uncached.read(i) for i in range(len(uncached))]


def test_stale_cache_is_detected_and_rebuilt_with_one_log_line(tmp_path, caplog):
    root = helpers.make_image_folder(tmp_path / "data", classes=2, train_per_class=3)
    split = root / "train"
    assert len(FolderReader(split, index_cache="")) == 6
    cls = sorted(p for p in split.iterdir())[0]
    (cls / "extra.JPEG").write_bytes(helpers.jpeg_bytes(0, 99))
    os.utime(cls, ns=(cls.stat().st_atime_ns, cls.stat().st_mtime_ns + 10**9))  # coarse-mtime filesystems too
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert len(FolderReader(split, index_cache="")) == 7
    stale = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(stale) == 1 and f"files added or removed in 1 class folders, e.g. {cls.name}" in stale[0]
    caplog.clear()
    (split / "n00000099").mkdir()
    (split / "n00000099" / "x.JPEG").write_bytes(helpers.jpeg_bytes(0, 98))
    with caplog.at_level(logging.INFO, logger="trainer"):
        reader = FolderReader(split, index_cache="")
    assert len(reader) == 8 and reader.classes[-1] == "n00000099"
    assert any("1 class folders added, 0 removed, e.g. n00000099" in r.getMessage() for r in caplog.records)


def test_unwritable_cache_location_is_a_warning_and_every_process_scans(tmp_path, caplog):
    root = helpers.make_image_folder(tmp_path / "data", classes=2, train_per_class=3)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable = str(blocker / "cache")  # its parent is a file: nothing can be created there (even as root)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        reader = FolderReader(root / "train", index_cache=unwritable, rank=0)
    assert len(reader) == 6 and reader.cache_file is None
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "cannot write the index cache" in warning and "data.index_cache" in warning
    # A process other than 0 does not wait for a file that cannot appear.
    start = time.monotonic()
    assert len(FolderReader(root / "train", index_cache=unwritable, rank=1, index_wait_s=30)) == 6
    assert time.monotonic() - start < 5


def test_waiting_process_times_out_naming_process_0_and_the_file(tmp_path):
    root = helpers.make_image_folder(tmp_path / "data", classes=2, train_per_class=2)
    with pytest.raises(
        DataError,
        match=r"process 3 waited 0 s for the folder index of .*which process 0 " r"writes to .*data.index_wait_s",
    ):
        FolderReader(root / "train", index_cache=str(tmp_path / "cache"), rank=3, index_wait_s=0.3)


def test_cache_file_round_trips_arrays_and_rejects_another_key(tmp_path):
    path = tmp_path / "x.bin"
    arrays = {"a": np.arange(5, dtype=np.int32), "b": np.array([b"x", b"yz"]), "empty": np.empty(0, dtype=np.int64)}
    index_cache.write(path, {"k": 1}, arrays, {"m": [1]})
    loaded = index_cache.load(path, {"k": 1})
    assert loaded.meta == {"m": [1]} and all(np.array_equal(loaded.arrays[k], v) for k, v in arrays.items())
    assert index_cache.load(path, {"k": 2}) is None
    path.write_bytes(path.read_bytes()[:20])  # a partial file is no index
    assert index_cache.load(path, {"k": 1}) is None


def test_check_data_uses_the_same_index(tmp_path):
    from trainer.__main__ import main

    root = helpers.make_image_folder(tmp_path / "data", classes=2, train_per_class=2, val_per_class=1)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{root: {root}}}\nloader: {{workers: 0}}\n")
    assert main(["check-data", "--config", str(config)]) == 0
    assert (root / ".trainer-index-train.bin").is_file() and (root / ".trainer-index-val.bin").is_file()
    assert folder_index.FORMAT == index_cache.read_header(root / ".trainer-index-train.bin")["key"]["format"]
