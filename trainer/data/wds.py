"""WebDataset tar shards (timm's imagenet-1k-wds layout), read by index or streamed.

Layout: `ROOT/<name>-<split>-NNNN.tar`, each sample a run of members sharing a key
(`<key>.jpg` and `<key>.cls`, the label as decimal text), and an optional
`ROOT/_info.json` with the shard sizes (`splits.<split>.shard_lengths`, `num_samples`)
and, when `trainer convert` wrote it, the class names (`classes`).

NOTE: read with `tarfile` and `os.pread`, not the `webdataset` package or `datasets`'
webdataset loader. An index of (shard, offset, size, label) built once from the tar
headers (and cached like the folder index) makes shards a random-access `Reader`: the
existing `EpochSampler` then gives a global shuffle, sharding by process, and exact
mid-epoch resume for free, and each sample costs one `pread` on an already open shard
(1,024 files instead of 1.28 M: no per-file metadata on NFS or Lustre). Both libraries
stream instead: a shuffle buffer of decoded-in-memory samples per worker, and resume
by replaying the stream. Measured on 25,000 samples (benchmarks/README.md): 44,100
samples/s by index in random order, against 2,760/s through `datasets`' streamed
webdataset loader (the `webdataset` package was not installed). The streamed mode
(`data.streaming=true`) is here too, for data read once in order, without an index.
"""

from __future__ import annotations

import json
import os
import random
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from trainer.data import index_cache as cache
from trainer.data.readers import IMG_EXTENSIONS, DataError, Sample

WDS_LAYOUT = (
    "ROOT/<name>-<split>-NNNN.tar shards of <key>.jpg + <key>.cls "
    "members (timm's imagenet-1k-wds), optional ROOT/_info.json"
)
IMAGE_EXTS = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)
FORMAT = 1
OPEN_SHARDS = 64  # open files kept per process for random access
SHUFFLE_BUFFER = 64  # samples per worker held for the streamed shuffle (about 7 MB of ImageNet JPEGs)


def find_shards(root: Path, split: str) -> list[Path]:
    """The split's shards in name order; none is a one-line error naming the layout."""
    if not root.is_dir():
        raise DataError(f"data.root: {root} does not exist; expected {WDS_LAYOUT}")
    shards = sorted(p for p in root.glob(f"*{split}-*.tar") if p.name.rsplit("-", 1)[0].endswith(split))
    if not shards:
        raise DataError(f"{root}: no tar shards for split '{split}' (*-{split}-NNNN.tar); expected {WDS_LAYOUT}")
    return shards


def read_info(root: Path) -> dict:
    """`_info.json`, or {} when absent; unreadable JSON is a one-line error."""
    path = root / "_info.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({err}); delete it or rewrite it with trainer convert") from None
    return info if isinstance(info, dict) else {}


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's grouping: the key is the path up to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _parse_label(data: bytes) -> int:
    try:
        return int(data.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return -1


def index_shard(path: Path) -> list[tuple[str, int, int, int]]:
    """(key, data offset, size, label) per sample of one shard, from its tar headers.

    A sample without an image gets offset -1, one without a readable `.cls` label -1;
    the dataset then skips and lists it like any bad sample.
    """
    samples: list[list] = []
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if not samples or samples[-1][0] != key:
                    samples.append([key, -1, 0, -1])
                if ext in IMAGE_EXTS:
                    samples[-1][1:3] = [member.offset_data, member.size]
                elif ext == "cls":
                    f.seek(member.offset_data)
                    samples[-1][3] = _parse_label(f.read(member.size))
                    f.seek(member.offset_data + member.size)  # tarfile reads on from where it left the file
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"{path}: not a readable tar shard ({err}); expected {WDS_LAYOUT}") from None
    return [tuple(s) for s in samples]


def build_index(shards: list[Path]) -> tuple[dict[str, np.ndarray], dict]:
    columns: list[list] = [[], [], [], [], []]
    for number, path in enumerate(shards):
        for key, offset, size, label in index_shard(path):
            for column, value in zip(columns, (number, offset, size, label, key)):
                column.append(value)
    shard, offset, size, label, keys = columns
    return {
        "shard": np.array(shard, dtype=np.int32),
        "offset": np.array(offset, dtype=np.int64),
        "size": np.array(size, dtype=np.int64),
        "label": np.array(label, dtype=np.int32),
        "key": np.array(keys, dtype=np.bytes_) if keys else np.empty(0, dtype="S1"),
    }, {"shards": [p.name for p in shards]}


def shard_fingerprint(root: Path, split: str, shards: list[Path]) -> dict:
    stats = [p.stat() for p in shards]
    return {
        "format": FORMAT,
        "dir": str(root.resolve()),
        "split": split,
        "shards": [p.name for p in shards],
        "bytes": [s.st_size for s in stats],
        "mtime_ns": [s.st_mtime_ns for s in stats],
    }


def class_names(info: dict, classes: list[str] | None, labels: np.ndarray | None, num_classes: int = 0) -> list[str]:
    """Given classes, else `_info.json`'s, else "0".."N-1" from the labels or model.num_classes."""
    if classes:
        return classes
    if isinstance(info.get("classes"), list) and info["classes"]:
        return [str(c) for c in info["classes"]]
    count = num_classes or (int(labels.max()) + 1 if labels is not None and len(labels) else 0)
    return [str(i) for i in range(count)]


class TarShardReader:
    """Random access to the samples of a split's shards, through a cached header index."""

    def __init__(
        self,
        root: Path,
        split: str,
        classes: list[str] | None = None,
        index_cache: str = "off",
        rank: int = 0,
        index_wait_s: float = 600.0,
    ) -> None:
        shards = find_shards(root, split)
        key = shard_fingerprint(root, split, shards)
        # beside the shards: ROOT/.trainer-index-wds-<split>.bin
        path = cache.cache_path(index_cache, root / split, f"wds-{split}")
        index = cache.load_or_build(
            path, key, lambda: build_index(shards), f"tar index of {root} [{split}]", rank, index_wait_s
        )
        self.root, self.split, self.cache_file = root, split, index.path
        self._shard_paths = [str(p) for p in shards]
        self._a = index.arrays
        self.classes = class_names(read_info(root), classes, self._a["label"])
        self._fds: OrderedDict[int, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._a["shard"])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()  # file descriptors do not travel to another process
        return state

    def _fd(self, shard: int) -> int:
        fd = self._fds.pop(shard, None)
        if fd is None:
            fd = os.open(self._shard_paths[shard], os.O_RDONLY)
            if len(self._fds) >= OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[shard] = fd
        return fd

    def read(self, index: int) -> Sample:
        a = self._a
        shard, offset, size = int(a["shard"][index]), int(a["offset"][index]), int(a["size"][index])
        name = f"{self._shard_paths[shard]}:{a['key'][index].decode()}"
        if offset < 0:
            return Sample(None, int(a["label"][index]), name)
        try:
            data = os.pread(self._fd(shard), size, offset)
        except OSError as err:
            raise OSError(err.errno, err.strerror, name) from None
        if len(data) != size:
            raise OSError(5, f"shard truncated: {len(data)} of {size} bytes", name)
        return Sample(data, int(a["label"][index]), name)

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


def iter_shard(path: Path) -> Iterator[tuple[str, bytes | None, int]]:
    """(key, image bytes or None, label or -1) per sample, reading the shard front to back."""
    key, image, label = None, None, -1
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name, ext = split_key(member.name)
            if name != key:
                if key is not None:
                    yield key, image, label
                key, image, label = name, None, -1
            if ext in IMAGE_EXTS:
                image = tar.extractfile(member).read()
            elif ext == "cls":
                label = _parse_label(tar.extractfile(member).read())
    if key is not None:
        yield key, image, label


class TarShardStream:
    """The split's shards streamed in order, split over processes and loader workers.

    Each epoch shuffles the shard order (seeded by seed and epoch) and splits the samples
    over the processes x workers (see `_spans`). Either way each sample is read by
    exactly one consumer per epoch, and the order is a pure function of (seed, epoch,
    process, worker), so replaying the stream to a mid-epoch position resumes exactly.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        classes: list[str] | None = None,
        num_classes: int = 0,
    ) -> None:
        self.shards = find_shards(root, split)
        info = read_info(root)
        split_info = info.get("splits", {}).get(split, {})
        self.num_samples = int(split_info.get("num_samples", 0) or 0)
        lengths = dict(zip(split_info.get("filenames", []), split_info.get("shard_lengths", [])))
        self.shard_lengths = (
            [int(lengths[p.name]) for p in self.shards] if all(p.name in lengths for p in self.shards) else None
        )
        self.classes = class_names(info, classes, None, num_classes)
        if not self.classes:
            raise DataError(
                f"{root} [{split}]: streamed shards name no classes (no classes in _info.json); set model.num_classes"
            )
        self.root, self.split, self.rank, self.world_size, self.seed, self.shuffle = (
            root,
            split,
            rank,
            world_size,
            seed,
            shuffle,
        )

    def _spans(self, order: list[int], consumers: int, me: int) -> list[tuple[int, int, int]]:
        """(shard, first, end) sample ranges this consumer reads, in order.

        With the shard sizes known (`_info.json`), the epoch's sample sequence is cut into
        `consumers` contiguous ranges that differ by at most one sample, so the processes
        stay balanced; a consumer reads at most two shards partly. Without them, whole
        shards are dealt out when there are enough, else every consumer reads every shard
        and keeps every n-th sample (first = -1 marks that).
        """
        if self.shard_lengths is not None:
            total = sum(self.shard_lengths)
            start, end = total * me // consumers, total * (me + 1) // consumers
            spans, position = [], 0
            for number in order:
                length = self.shard_lengths[number]
                if position < end and position + length > start:
                    spans.append((number, max(start - position, 0), min(end - position, length)))
                position += length
            return spans
        if len(order) >= consumers:
            return [(number, 0, -1) for number in order[me::consumers]]
        return [(number, -1, -1) for number in order]

    def iter_samples(self, epoch: int) -> Iterator[Sample]:
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        consumers, me = self.world_size * workers, self.rank * workers + worker_id
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = torch.randperm(
                len(order), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            ).tolist()
        rng = random.Random(f"{self.seed}/{epoch}/{me}")
        buffer: list[Sample] = []
        ordinal = 0  # samples seen over all shards (the every-n-th split)
        for number, first, end in self._spans(order, consumers, me):
            path = self.shards[number]
            count = 0
            try:
                for position, (key, image, label) in enumerate(iter_shard(path)):
                    count, ordinal = position + 1, ordinal + 1
                    if first == -1 and (ordinal - 1) % consumers != me or position < first:
                        continue
                    if end != -1 and position >= end:
                        break
                    sample = Sample(image, label, f"{path}:{key}")
                    if not self.shuffle:
                        yield sample
                        continue
                    buffer.append(sample)
                    if len(buffer) >= SHUFFLE_BUFFER:
                        yield buffer.pop(rng.randrange(len(buffer)))
            except (OSError, tarfile.TarError) as err:
                # NOTE: the rest of a broken shard is lost; name it, as a skipped sample, and go on.
                yield Sample(None, -1, f"{path}: unreadable after {count} samples ({err})")
                continue
            if (
                self.shard_lengths is not None
                and end >= self.shard_lengths[number]
                and count != self.shard_lengths[number]
            ):
                raise DataError(
                    f"{path}: {count} samples, but {self.root / '_info.json'} says {self.shard_lengths[number]}; "
                    "fix or delete _info.json (without it whole shards are dealt out)"
                )
        rng.shuffle(buffer)
        yield from buffer
