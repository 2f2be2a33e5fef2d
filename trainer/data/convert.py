"""`trainer convert`: any source the trainer reads -> WebDataset tar shards or HF parquet shards.

Both splits are written (the training split shuffled, so that each shard holds every
class, which a streamed read needs), with the sizes file, then read back through the
trainer's own reader and compared with what was read from the source: the same
multiset of (CRC-32, size, label). Training from the output then needs only
`data.source` and `data.root` changed: the validation split is written under the name
the target source looks for by default.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import tarfile
import time
import zlib
from argparse import Namespace
from pathlib import Path

import numpy as np

from trainer.config import Config
from trainer.data.readers import DataError, Reader
from trainer.data.sources import create_reader

DEFAULT_SHARD_SIZE = 1250  # samples per shard: ImageNet's train split in 1,025 shards of ~140 MB, as timm's


def _ext(data: bytes, name: str) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    suffix = Path(name).suffix.lower().lstrip(".")
    return {"jpeg": "jpg", "": "jpg"}.get(suffix, suffix)


def _key(ordinal: int, name: str) -> str:
    """A WebDataset key (no dots or slashes) that keeps the source file's stem for error messages."""
    return f"{ordinal:08d}_" + re.sub(r"[^A-Za-z0-9_-]+", "_", Path(name).stem)[:80]


def _fingerprint(data: bytes, label: int) -> tuple[int, int, int]:
    return zlib.crc32(data), len(data), label


class _WdsWriter:
    def __init__(self, out: Path, prefix: str, split: str) -> None:
        self.out, self.prefix, self.split = out, prefix, split
        self.tar: tarfile.TarFile | None = None
        self.names: list[str] = []
        self.lengths: list[int] = []

    def open_shard(self, number: int) -> None:
        self.close_shard()
        name = f"{self.prefix}-{self.split}-{number:04d}.tar"
        self.tar = tarfile.open(self.out / name, "w", format=tarfile.USTAR_FORMAT)
        self.names.append(name)
        self.lengths.append(0)

    def add(self, key: str, data: bytes, ext: str, label: int) -> None:
        import io

        for member, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
            info = tarfile.TarInfo(member)
            info.size, info.mtime, info.mode = len(payload), 0, 0o444
            self.tar.addfile(info, io.BytesIO(payload))
        self.lengths[-1] += 1

    def close_shard(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


class _ParquetWriter:
    def __init__(self, out: Path, split: str, classes: list[str], shards: int) -> None:
        import pyarrow as pa

        self.pa, self.out, self.split, self.shards = pa, out / "data", split, shards
        self.out.mkdir(parents=True, exist_ok=True)
        features = {"image": {"_type": "Image"}, "label": {"names": classes, "_type": "ClassLabel"}}
        self.schema = pa.schema(
            [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
            metadata={"huggingface": json.dumps({"info": {"features": features}})},
        )
        self.rows: list = []
        self.names: list[str] = []
        self.lengths: list[int] = []

    def open_shard(self, number: int) -> None:
        self.close_shard()
        self.names.append(f"{self.split}-{number:05d}-of-{self.shards:05d}.parquet")
        self.lengths.append(0)

    def add(self, key: str, data: bytes, ext: str, label: int) -> None:
        self.rows.append(({"bytes": data, "path": f"{key}.{ext}"}, label))
        self.lengths[-1] += 1

    def close_shard(self) -> None:
        if not self.names or not self.rows:
            return
        import pyarrow.parquet as pq

        images, labels = zip(*self.rows)
        table = self.pa.table({"image": list(images), "label": list(labels)}, schema=self.schema)
        pq.write_table(table, self.out / self.names[-1])
        self.rows = []


def write_split(
    reader: Reader, writer, split: str, shard_size: int, shuffle_seed: int | None
) -> tuple[list, list[str], float]:
    """Copy every readable sample; returns (fingerprints written, skipped names, seconds)."""
    from tqdm import tqdm

    order = np.arange(len(reader))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(order)
    written, skipped = [], []
    start = time.perf_counter()
    for ordinal, index in enumerate(tqdm(order, desc=f"convert {split}", unit="img", file=sys.stderr, mininterval=2.0)):
        try:
            sample = reader.read(int(index))
        except OSError as err:
            skipped.append(f"{getattr(err, 'filename', None) or f'sample {index}'}\tunreadable: {err.strerror or err}")
            continue
        if sample.data is None or sample.label < 0:
            skipped.append(f"{sample.name}\t{'no image' if sample.data is None else 'no label'}")
            continue
        if len(written) % shard_size == 0:
            writer.open_shard(len(written) // shard_size)
        writer.add(_key(ordinal, sample.name), sample.data, _ext(sample.data, sample.name), sample.label)
        written.append(_fingerprint(sample.data, sample.label))
    writer.close_shard()
    return written, skipped, time.perf_counter() - start


def verify(expected: list, reader: Reader, what: str) -> None:
    """The output holds the same samples and labels as were read from the source."""
    found = []
    for index in range(len(reader)):
        sample = reader.read(index)
        found.append(_fingerprint(sample.data or b"", sample.label))
    if sorted(found) != sorted(expected):
        missing = len(set(expected) - set(found))
        raise DataError(
            f"{what}: verification failed: {len(found)} samples read back for "
            f"{len(expected)} written, {missing} differ; delete the output "
            "and convert again"
        )


def convert_command(cfg: Config, args: Namespace) -> int:
    """Write `cfg.data`'s train and val splits to `args.out` as `args.to` shards, then verify."""
    d = dataclasses.replace(cfg.data, streaming=False)
    out = Path(args.out).expanduser()
    if args.shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {args.shard_size}")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: output directory is not empty; give a new one")
    out.mkdir(parents=True, exist_ok=True)
    train = create_reader(d, d.train_split)
    val_split = d.val_split or ("val" if d.source == "folder" else "validation")
    val = create_reader(d, val_split, classes=train.classes)
    out_val = d.val_split or "validation"  # what the target source reads by default
    prefix = re.sub(r"[^A-Za-z0-9_]+", "_", Path(d.root).expanduser().resolve().name) or "data"
    info: dict = {"name": prefix, "classes": list(train.classes), "splits": {}}
    total, total_s = 0, 0.0
    for split, out_split, reader, seed in ((d.train_split, d.train_split, train, 0), (val_split, out_val, val, None)):
        shards = -(-len(reader) // args.shard_size)
        writer = (
            _WdsWriter(out, prefix, out_split)
            if args.to == "wds"
            else _ParquetWriter(out, out_split, list(train.classes), shards)
        )
        written, skipped, seconds = write_split(reader, writer, out_split, args.shard_size, seed)
        for line in skipped[:10]:
            print(f"convert: skipped {line}", file=sys.stderr)
        if skipped:
            print(
                f"convert: {split}: {len(skipped)} samples skipped (unreadable, or without image or label)",
                file=sys.stderr,
            )
        info["splits"][out_split] = {
            "num_samples": len(written),
            "filenames": writer.names,
            "shard_lengths": writer.lengths,
        }
        (out / "_info.json").write_text(json.dumps(info, indent=1) + "\n")
        target = dataclasses.replace(
            d,
            source=args.to if args.to == "wds" else "hf",
            root=str(out),
            val_split="",
            max_train_samples=0,
            max_val_samples=0,
        )
        verify(written, create_reader(target, out_split, classes=list(train.classes)), f"{out} [{out_split}]")
        total, total_s = total + len(written), total_s + seconds
        print(
            f"convert: {split} -> {out_split}: {len(written)} samples in "
            f"{len(writer.names)} shards "
            f"({len(written) / max(seconds, 1e-9):.0f} files/s), verified"
        )
    source = "wds" if args.to == "wds" else "hf"
    print(
        f"convert: wrote {total} samples to {out} "
        f"({total / max(total_s, 1e-9):.0f} files/s); train from it with "
        f"data.source={source} data.root={out}"
    )
    return 0
