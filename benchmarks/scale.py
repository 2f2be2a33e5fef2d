"""ImageNet at full size on this machine: indexing, launch, worker memory, convert, shards.

Builds a synthetic ImageNet-size tree of hard links (only inodes' directory entries on
disk; a file has a link limit, so the links are spread over SOURCES distinct JPEGs):
`train/` 1,000 classes x 1,281, `train-128k/` and `train-640k/` (same classes, fewer
files, for linearity), and a flat `val/` of 50,000 ILSVRC-named files with
`LOC_val_solution.csv`. Then measures the figures of benchmarks/README.md and writes
them as JSON. Never run in CI: it needs minutes and ~2.5 M directory entries.

    python benchmarks/scale.py --root /tmp/scale --out benchmarks/scale.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# a sibling module: these scripts run as benchmarks/<name>.py
from harness import kill_marked, machine, two_process_launcher

REPO = Path(__file__).resolve().parent.parent
CLASSES, PER_CLASS, VAL = 1000, 1281, 50_000
SOURCES = 64


def wnid(i: int) -> str:
    return f"n{i:08d}"


def source_jpegs(folder: Path) -> list[Path]:
    """SOURCES distinct ~500x375 JPEGs of ImageNet's typical size (noise, so ~100 KB each)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for i in range(SOURCES):
        path = folder / f"src{i:03d}.JPEG"
        if not path.exists():
            base = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)
            image = Image.fromarray(base).resize((500, 375), Image.BILINEAR)
            noisy = np.asarray(image, dtype=np.int16) + rng.integers(-20, 20, (375, 500, 3))
            buf = io.BytesIO()
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def build_tree(root: Path) -> dict:
    start = time.perf_counter()
    sources = source_jpegs(root / "_sources")
    made = 0
    for split, per_class in (("train", PER_CLASS), ("train-640k", PER_CLASS // 2), ("train-128k", PER_CLASS // 10)):
        if (root / split / wnid(CLASSES - 1)).is_dir():
            continue
        for c in range(CLASSES):
            folder = root / split / wnid(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                os.link(sources[(c * 7 + i) % SOURCES], folder / f"{wnid(c)}_{i}.JPEG")
                made += 1
    if not (root / "val").is_dir():
        (root / "val").mkdir()
        rows = []
        for i in range(VAL):
            name = f"ILSVRC2012_val_{i + 1:08d}"
            os.link(sources[i % SOURCES], root / "val" / f"{name}.JPEG")
            rows.append(f"{name},{wnid(i % CLASSES)} 1 2 3 4")
            made += 1
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return {"links_made": made, "seconds": round(time.perf_counter() - start, 1)}


def drop_caches() -> bool:
    """Drop the page, dentry and inode caches (root only); False when not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def python(code: str, *args: str, env: dict | None = None) -> dict:
    """Run `code` in a fresh interpreter (the trainer importable); it prints one JSON line."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=1200,
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


INDEX = """
import json, os, resource, sys, time
from pathlib import Path
calls = [0]
real = os.scandir
def counting(*a):
    calls[0] += 1
    return real(*a)
os.scandir = counting
from trainer.data.readers import FolderReader
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
calls[0] = 0  # imports list directories too: count only the indexing
start = time.perf_counter()
reader = FolderReader(Path(sys.argv[1]), index_cache=sys.argv[2], rank=int(sys.argv[3]), index_wait_s=600)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
arrays = reader._paths.nbytes + reader._labels.nbytes
print(json.dumps({
    "files": len(reader), "seconds": round(seconds, 3), "peak_growth_mb": round((peak - before) / 1024, 1),
    "arrays_mb": round(arrays / 2**20, 1), "scandir_calls": calls[0],
    "from_cache": int(sys.argv[3]) != 0 or sys.argv[4] == "reuse",
}))
"""


def index_figures(root: Path, cache: Path) -> dict:
    figures: dict = {"cold_cache_possible": drop_caches()}
    for split in ("train-128k", "train-640k", "train"):
        shutil.rmtree(cache, ignore_errors=True)
        drop_caches()
        cold = python(INDEX, str(root / split), str(cache), "0", "build")
        warm_rebuild = python(INDEX, str(root / split), "off", "0", "build")
        reuse = python(INDEX, str(root / split), str(cache), "1", "reuse")
        drop_caches()
        reuse_cold = python(INDEX, str(root / split), str(cache), "0", "reuse")
        figures[split] = {
            "first_index_cold": cold,
            "index_warm_no_cache": warm_rebuild,
            "reuse_other_process": reuse,
            "reuse_later_run_cold": reuse_cold,
        }
    return figures


def listings_per_job(root: Path, cache: Path, processes: int = 8) -> dict:
    """Directory listings of `processes` processes indexing train/ at once, with and without the cache."""
    result = {}
    for setting in ("cache", "off"):
        shutil.rmtree(cache, ignore_errors=True)
        where = str(cache) if setting == "cache" else "off"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", INDEX, str(root / "train"), where, str(rank), "build"],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for rank in range(processes)
        ]
        outs = [json.loads(p.communicate(timeout=1200)[0].strip().splitlines()[-1]) for p in procs]
        result[setting] = {
            "scandir_calls": sum(o["scandir_calls"] for o in outs),
            "slowest_s": max(o["seconds"] for o in outs),
        }
    return result


def launch_to_first_step(root: Path, cache: Path, workdir: Path) -> dict:
    """`accelerate launch`, 2 processes x 4 workers, cold caches: seconds until step 1 is logged."""
    shutil.rmtree(cache, ignore_errors=True)
    config = workdir / "scale.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"name": "resnet18"},
                "data": {"root": str(root), "index_cache": str(cache)},
                "loader": {"workers": 4, "batch_size_per_device": 16},
                "input": {"img_size": 128},
                "train": {"epochs": 1, "precision": "fp32", "log_every_steps": 1, "max_steps_per_epoch": 2},
                "output": {"dir": str(workdir / "runs"), "progress": "log", "plots": False},
            }
        )
    )
    results = {}
    for run in ("first", "cache_reused"):
        cold = drop_caches()
        cmd = [
            *two_process_launcher(),
            "trainer",
            "train",
            "--config",
            str(config),
        ]
        start = time.perf_counter()
        marker = f"{os.getpid()}-{run}"
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "SCALE_RUN": marker},
        )
        seconds, tail = None, []
        for line in proc.stderr:
            tail.append(line)
            if "step 1/" in line:
                seconds = time.perf_counter() - start
                break
        kill_marked("SCALE_RUN", marker)  # torchrun starts the training processes in sessions of their own
        proc.wait()
        results[run] = {
            "seconds": round(seconds, 1) if seconds else None,
            "cold_cache": cold,
            "tail": None if seconds else "".join(tail[-5:]),
        }
    return results


WORKER_MEMORY = """
import json, sys, time
from pathlib import Path
import psutil
from trainer.config import Config, DataConfig, InputConfig, LoaderConfig
from trainer.data.loader import create_datasets, create_loader
cfg = Config(
    data=DataConfig(source=sys.argv[2], root=sys.argv[1], index_cache=sys.argv[4]),
    loader=LoaderConfig(workers=int(sys.argv[3]), batch_size_per_device=64, persistent_workers=True),
    input=InputConfig(img_size=160),
)
data = create_datasets(**cfg.data_sections(), model_name="resnet50", seed=0, rank=0, world_size=1)
loader = create_loader(data.train, cfg.loader, batch_size=64, pin_kwargs={}, sampler=data.train_sampler, drop_last=True)
def uss():
    return [psutil.Process(w.pid).memory_full_info().uss for w in loader._iterator._workers]
n, start, first = 0, None, None
it = iter(loader)
for batch in it:
    n += len(batch["labels"])
    if first is None and n >= 64 * cfg.loader.workers * 2:
        first, start, n0 = uss(), time.perf_counter(), n
    if n >= int(sys.argv[5]) + n0 if first else False:
        break
last = uss()
print(json.dumps({
    "samples": n - n0, "img_per_s": round((n - n0) / (time.perf_counter() - start), 1),
    "uss_start_mb": [round(u / 2**20, 1) for u in first], "uss_end_mb": [round(u / 2**20, 1) for u in last],
    "growth_mb": [round((b - a) / 2**20, 1) for a, b in zip(first, last)],
}))
"""


def convert_and_shards(root: Path, workdir: Path, files: int) -> dict:
    """`trainer convert` of a `files`-file copy of the tree, then the input pipeline from folder vs shards."""
    small = workdir / "small"
    if not small.exists():
        per_class = files // CLASSES
        for c in range(CLASSES):
            (small / "train" / wnid(c)).mkdir(parents=True)
            (small / "val" / wnid(c)).mkdir(parents=True)
            for i in range(per_class):
                os.link(
                    root / "train" / wnid(c) / f"{wnid(c)}_{i}.JPEG", small / "train" / wnid(c) / f"{wnid(c)}_{i}.JPEG"
                )
            os.link(root / "train" / wnid(c) / f"{wnid(c)}_{per_class}.JPEG", small / "val" / wnid(c) / "v.JPEG")
    out = workdir / "shards"
    shutil.rmtree(out, ignore_errors=True)
    config = workdir / "convert.yaml"
    config.write_text(json.dumps({"data": {"root": str(small)}}))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "convert", "--config", str(config), "--to", "wds", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    total = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("convert:")]
    pipelines = {}
    for source, data_root in (("folder", small), ("wds", out)):
        pipelines[source] = python(WORKER_MEMORY, str(data_root), source, "2", "", str(6_000))
    return {
        "files": files,
        "convert_lines": lines,
        "convert_total_s_with_verify": round(total, 1),
        "pipeline_folder": pipelines["folder"],
        "pipeline_wds": pipelines["wds"],
        "wds_vs_folder": round(pipelines["wds"]["img_per_s"] / pipelines["folder"]["img_per_s"], 3),
    }


READERS = """
import glob, json, sys, time
from pathlib import Path
root, n = Path(sys.argv[1]), int(sys.argv[2])
def rate(samples):
    start, count, size = time.perf_counter(), 0, 0
    for data in samples:
        count, size = count + 1, size + len(data)
        if count >= n:
            break
    return round(count / (time.perf_counter() - start), 1)
from trainer.data.wds import TarShardReader, TarShardStream
import numpy as np
reader = TarShardReader(root, "train")
order = np.random.default_rng(0).permutation(len(reader))
figures = {"trainer_random_access": rate(reader.read(int(i)).data for i in order)}
figures["trainer_stream"] = rate(s.data for s in TarShardStream(root, "train", 0, 1, 0, shuffle=True).iter_samples(0))
import os
os.environ["HF_DATASETS_OFFLINE"] = "1"
import datasets
files = sorted(glob.glob(str(root / "*-train-*.tar")))
start = time.perf_counter()
ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
ds = ds.cast_column("jpg", datasets.Image(decode=False)).shuffle(seed=0, buffer_size=1000)
figures["datasets_webdataset_stream"] = rate(row["jpg"]["bytes"] for row in ds)
figures["datasets_open_s"] = round(time.perf_counter() - start, 2)
print(json.dumps(figures))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/scale", help="where the synthetic tree is built (kept for reruns)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "scale.json"))
    parser.add_argument(
        "--only", default="", help="comma-separated parts: tree,index,listings,launch,memory,convert,readers"
    )
    parser.add_argument("--convert-files", type=int, default=25_000)
    args = parser.parse_args()
    root, parts = (
        Path(args.root),
        set(filter(None, args.only.split(",")))
        or {"tree", "index", "listings", "launch", "memory", "convert", "readers"},
    )
    workdir, cache = root / "_work", root / "_work" / "index-cache"
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["machine"] = machine()
    steps = [
        ("tree", lambda: build_tree(root)),
        ("index", lambda: index_figures(root, cache)),
        ("listings", lambda: listings_per_job(root, cache)),
        ("launch", lambda: launch_to_first_step(root, cache, workdir)),
        ("memory", lambda: python(WORKER_MEMORY, str(root), "folder", "2", str(cache), "20000")),
        ("convert", lambda: convert_and_shards(root, workdir, args.convert_files)),
        ("readers", lambda: python(READERS, str(workdir / "shards"), "20000")),
    ]
    for name, step in steps:
        if name in parts:
            print(f"scale: {name} ...", file=sys.stderr, flush=True)
            results[name] = step()
            print(json.dumps(results[name], indent=1), file=sys.stderr, flush=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
