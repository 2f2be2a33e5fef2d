"""An index of a source's files, built once per job and shared through a cache file.

A folder of 1.28 M JPEGs in 1,000 class folders costs 1,001 directory listings to index;
on NFS or Lustre, 8 processes per machine each listing them is the metadata storm that
makes a start take minutes. Here process 0 builds the index (numpy arrays), writes it
to one file, and every other process waits for that file and maps it into memory. A
later run on unchanged data reuses it.

The cache is keyed by a cheap fingerprint of the data (for a folder: the class folders'
names and modification times, one listing of the split plus one stat per class; a
folder's mtime changes whenever a file in it is added, removed or renamed), so a stale
file is detected without listing every class.

File layout: 8-byte magic, 8-byte header length, a JSON header (key, metadata, and the
dtype, shape and offset of each array), then the arrays' raw bytes, 64-byte aligned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.errors import DataError

log = logging.getLogger("trainer")

MAGIC = b"TRNIDX01"
ALIGN = 64
POLL_S = 0.2


@dataclass
class CachedIndex:
    """Arrays (memory-mapped when loaded from the file) and their JSON-able metadata."""

    arrays: dict[str, np.ndarray]
    meta: dict
    path: Path | None  # the cache file they came from or were written to; None if not cached


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainer" / "index"


def cache_path(setting: str, data_dir: Path, name: str) -> Path | None:
    """Where the index of `data_dir` lives: None when `setting` is "off".

    Args:
        setting: `data.index_cache`: "" (beside the data if writable, else the user cache),
            "off", or a directory.
        data_dir: The folder indexed (a split folder, or a folder of tar shards).
        name: The split, for a readable file name.
    """
    if setting == "off":
        return None
    data_dir = data_dir.resolve()
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:12]
    if setting:
        return Path(setting).expanduser() / f"trainer-index-{name}-{digest}.bin"
    if os.access(data_dir.parent, os.W_OK):
        return data_dir.parent / f".trainer-index-{name}.bin"
    return user_cache_dir() / f"trainer-index-{name}-{digest}.bin"


def _writable(path: Path) -> bool:
    """Whether `path` could be created: its nearest existing parent is writable."""
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            return parent.is_dir() and os.access(parent, os.W_OK)
    return False


def read_header(path: Path) -> dict | None:
    """The header of a cache file, or None if it is absent, partial or not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                return None
            (length,) = struct.unpack("<Q", head[8:])
            return json.loads(f.read(length))
    except (OSError, ValueError):
        return None


def load(path: Path, key: dict) -> CachedIndex | None:
    """The cached index if the file holds one for `key`, else None; arrays are memory-mapped."""
    header = read_header(path)
    if header is None or header.get("key") != key:
        return None
    arrays = {}
    try:
        for name, spec in header["arrays"].items():
            shape = tuple(spec["shape"])
            if not np.prod(shape):  # np.memmap refuses an empty map
                arrays[name] = np.empty(shape, dtype=spec["dtype"])
            else:
                arrays[name] = np.memmap(path, dtype=spec["dtype"], mode="r", offset=spec["offset"], shape=shape)
    except (OSError, ValueError):
        return None
    return CachedIndex(arrays, header["meta"], path)


def write(path: Path, key: dict, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write atomically (a temporary file renamed into place): a reader never sees half a file."""
    specs, offset = {}, 0
    for name, array in arrays.items():
        specs[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": offset}
        offset += -(-array.nbytes // ALIGN) * ALIGN
    # Offsets above are relative to the data start, which depends on the header's length.
    body = json.dumps({"key": key, "meta": meta, "arrays": specs}).encode()
    start = -(-(16 + len(body) + 32) // ALIGN) * ALIGN
    for spec in specs.values():
        spec["offset"] += start
    body = json.dumps({"key": key, "meta": meta, "arrays": specs}).encode()
    assert 16 + len(body) <= start
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)  # mkstemp's 0600 would hide the cache from the other users of shared data
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(body)) + body)
            for name, array in arrays.items():
                f.seek(specs[name]["offset"])
                f.write(np.ascontiguousarray(array).data)
            f.truncate(max([start] + [s["offset"] + arrays[n].nbytes for n, s in specs.items()]))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_build(
    path: Path | None,
    key: dict,
    build: Callable[[], tuple[dict[str, np.ndarray], dict]],
    what: str,
    rank: int,
    wait_s: float,
    stale_reason: Callable[[dict], str] | None = None,
) -> CachedIndex:
    """The index for `key`: loaded from `path`, or built (process 0) and written there.

    Process 0 (`rank` 0) builds when the file is absent or stale and writes it; a write
    that fails is a warning and the run goes on. Other processes wait up to `wait_s` for
    a file matching `key`; when the location cannot be written at all, each builds its own.

    Args:
        path: The cache file; None builds in every process (data.index_cache=off).
        key: The fingerprint the file must carry.
        build: Makes (arrays, metadata) from the data itself.
        what: Names the data in log lines and errors, e.g. "folder index of /data/train".
        rank: This process's global index.
        wait_s: How long a process other than 0 waits for the file.
        stale_reason: Says why an existing file's header no longer matches (one log line).

    Raises:
        DataError: a process other than 0 waited `wait_s` in vain; the message names the
            file, process 0 and the likely causes.
    """
    if path is None:
        return CachedIndex(*build(), None)
    found = load(path, key)
    if found is not None:
        log.info("%s: reusing %s", what, path)
        return found
    if rank != 0 and _writable(path):
        deadline = time.monotonic() + wait_s
        while found is None:
            if time.monotonic() > deadline:
                raise DataError(
                    f"data.index_cache: process {rank} waited {wait_s:.0f} s for the "
                    f"{what}, which process 0 writes to {path}: "
                    f"process 0 failed or is still indexing, or {path.parent} is not shared between the machines; "
                    "raise data.index_wait_s, or set data.index_cache to a shared directory (or off)"
                )
            time.sleep(POLL_S)
            found = load(path, key)
        return found
    old = read_header(path)
    if old is not None and rank == 0:
        why = stale_reason(old.get("key", {})) if stale_reason else "the data changed"
        log.info("%s: cache %s is stale (%s); rebuilding", what, path, why)
    arrays, meta = build()
    if rank == 0:
        try:
            write(path, key, arrays, meta)
        except OSError as err:
            log.warning(
                "%s: cannot write the index cache %s (%s); every process indexes "
                "the data itself. Set data.index_cache to a writable directory",
                what,
                path,
                err.strerror or err,
            )
            return CachedIndex(arrays, meta, None)
    return CachedIndex(arrays, meta, path if rank == 0 else None)
