"""`trainer check-data`: scan both splits before a long run and report what would go wrong.

Every image is fully decoded by `inspect_image`, the same code the training pipeline
runs, so a file reported clean here decodes in training, and one reported unreadable is
one training would skip (or stop at, with data.on_error=raise).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from argparse import Namespace

from trainer.config import Config, DataConfig
from trainer.data.decode import inspect_image
from trainer.data.loader import effective_num_classes, worker_context
from trainer.data.readers import Reader
from trainer.data.sources import Source, get_source
from trainer.data.worker_signals import restore_stop_signals

PROGRESS_EVERY = 5000  # files between progress lines
BLOCKING = ("unreadable files", "label problems", "class mismatches", "empty classes")


class Findings:
    """Counts and the first `examples` names of each (category, kind) found."""

    def __init__(self, examples: int) -> None:
        self.examples = examples
        self.kinds: dict[str, dict[str, list]] = {}  # category -> kind -> [count, names]

    def add(self, category: str, kind: str, name: str) -> None:
        entry = self.kinds.setdefault(category, {}).setdefault(kind, [0, []])
        entry[0] += 1
        if len(entry[1]) < self.examples:
            entry[1].append(name)

    def count(self, category: str) -> int:
        return sum(count for count, _ in self.kinds.get(category, {}).values())

    def report(self) -> str:
        lines = []
        for category in (*BLOCKING, "conversions"):
            title = "conversions needed (decoded fine, converted on the fly)" if category == "conversions" else category
            lines.append(f"{title}: {self.count(category)}")
            for kind, (count, names) in sorted(self.kinds.get(category, {}).items(), key=lambda kv: -kv[1][0]):
                lines.append(f"  {kind}: {count}")
                lines.extend(f"    {name}" for name in names)
        return "\n".join(lines)


def _open_split(source: Source, cfg: DataConfig, split: str, classes: list[str] | None) -> tuple[Reader, list[str]]:
    """The split's reader and the classes it found empty (reported, not raised)."""
    if source.open_for_check is not None:
        return source.open_for_check(cfg, split, classes)
    return source.open(cfg, split, classes), []


_worker_reader: Reader | None = None


def _init_worker(reader: Reader) -> None:
    global _worker_reader
    _worker_reader = reader
    restore_stop_signals()  # a pool worker ends with Ctrl-C (and Pool.terminate) as usual; no-op in this process


def _inspect(index: int) -> tuple[str, int, str | None, tuple[str, ...]]:
    """(name, label, problem, conversions) of one sample; never raises for bad data."""
    try:
        sample = _worker_reader.read(index)
    except OSError as err:
        return getattr(err, "filename", None) or f"sample {index}", -1, f"unreadable: {err.strerror or err}", ()
    if sample.data is None:
        return sample.name, sample.label, "row has no image", ()
    info = inspect_image(sample.data, sample.name)
    return sample.name, sample.label, info.problem, info.conversions


def _scan(
    reader: Reader, split: str, count: int, workers: int, num_classes: int | None, findings: Findings
) -> set[int]:
    """Inspect the first `count` samples; returns the labels seen. `num_classes` None: no label check."""
    seen: set[int] = set()
    start = time.perf_counter()
    # NOTE: workers from the loaders' fork server, not a fork of this process: opening a
    # source can start threads (pyarrow's pool for hf), whose held locks a fork would copy.
    pool = worker_context().Pool(workers, _init_worker, (reader,)) if workers > 0 else None
    _init_worker(reader)
    results = pool.imap(_inspect, range(count), chunksize=32) if pool else map(_inspect, range(count))
    try:
        for done, (name, label, problem, conversions) in enumerate(results, 1):
            if problem is not None:
                # "corrupt JPEG (OSError: ...)" -> "corrupt JPEG": group by cause, not message.
                findings.add("unreadable files", problem.split(" (")[0], f"{name}: {problem}")
            elif num_classes is not None and not 0 <= label < num_classes:
                # NOTE: the HF reader gives -1 for a missing label, as datasets' ClassLabel does.
                kind = "label missing (-1)" if label == -1 else f"label out of range [0, {num_classes})"
                findings.add("label problems", kind, f"{name}: label {label}")
            else:
                seen.add(label)
            for kind in conversions:
                findings.add("conversions", kind, name)
            if done % PROGRESS_EVERY == 0:
                rate = done / (time.perf_counter() - start)
                print(f"check-data: {split} {done}/{count} ({rate:.0f} files/s)", file=sys.stderr, flush=True)
    except BaseException:
        if pool:
            pool.terminate()
        raise
    if pool:
        # NOTE: close, not terminate: a process the loaders' fork server forks ignores SIGTERM
        # until `_init_worker` has run in it, and terminate() would wait for such a one for ever.
        pool.close()
        pool.join()
    return seen


def check_data_command(cfg: Config, args: Namespace) -> int:
    """Scan train and val of `cfg.data`; print a summary; 0 if nothing blocks a run, else 1.

    Args:
        cfg: The run config; only `data` (and `model.num_classes`) are used.
        args: `limit` (first N samples per split, 0 for all) and `examples` (names shown per kind).
    """
    d = dataclasses.replace(cfg.data, streaming=False)  # every row is read once, by index
    findings = Findings(max(args.examples, 0))
    source = get_source(d.source)
    by_folder = source.labels_from_folders  # labels in range by construction, classes told by folder name
    val_split = source.val_split(d)
    workers = min(cfg.loader.workers, os.cpu_count() or 1)
    train, empty_train = _open_split(source, d, d.train_split, None)
    val, empty_val = _open_split(source, d, val_split, train.classes)
    num_classes = effective_num_classes(cfg.model.num_classes, train.classes)
    if by_folder and num_classes < len(train.classes):
        findings.add(
            "label problems",
            "model.num_classes below the class folders",
            f"model.num_classes={num_classes} < {len(train.classes)} classes",
        )
    counts, seen = {}, {}
    for split, reader, empty in ((d.train_split, train, empty_train), (val_split, val, empty_val)):
        for name in empty:
            findings.add("empty classes", f"empty {split} class folders", f"{split}/{name}")
        counts[split] = (min(args.limit, len(reader)) if args.limit > 0 else len(reader), len(reader))
        seen[split] = _scan(reader, split, counts[split][0], workers, None if by_folder else num_classes, findings)
    if by_folder:  # a class is its folder name, whatever the labels
        names = {d.train_split: set(train.classes) - set(empty_train), val_split: set(val.classes) - set(empty_val)}
    else:
        names = {
            split: {train.classes[i] if i < len(train.classes) else str(i) for i in labels}
            for split, labels in seen.items()
        }
    complete = by_folder or all(done == total for done, total in counts.values())
    if complete:  # a partial HF scan sees only some labels: no mismatch can be told from it
        for a, b in ((val_split, d.train_split), (d.train_split, val_split)):
            for name in sorted(names[a] - names[b]):
                findings.add("class mismatches", f"{a} classes absent from {b}", name)
    scanned = ", ".join(f"{split} {done} of {total}" for split, (done, total) in counts.items())
    print(f"check-data: {d.root} ({d.source}): {scanned} images, {len(train.classes)} classes")
    print(findings.report())
    if not complete:
        print(f"note: class mismatches are not checked on a partial scan (--limit {args.limit})")
    blocking = [c for c in BLOCKING if findings.count(c)]
    if blocking:
        print(f"result: problems found ({', '.join(blocking)}); fix them before a long run")
        return 1
    print("result: ok" + (" (conversions are done on the fly)" if findings.count("conversions") else ""))
    return 0
