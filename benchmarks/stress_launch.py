"""Consecutive 2-process launches of one short epoch while a CPU-bound process competes.

    python benchmarks/stress_launch.py --launches 20

Each launch is the demo recipe on `configs/accelerate/cpu_2proc.yaml`, one epoch of 64
training and 64 validation images, with loader workers (the demo's 1 per process) and a
log line after every step. A launch that has not finished after `--hang-s` seconds counts
as a hang and is killed. Reported: launches finished, hangs, median and worst wall time,
and the time from the launch to the first step's log line (start-up). `--pythonpath`
points the launches at another checkout of the trainer (for a before/after comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# a sibling module: these scripts run as benchmarks/<name>.py
from harness import REPO, kill_marked, two_process_launcher


def one_launch(index: int, out: Path, pythonpath: str, hang_s: float) -> dict:
    cmd = [
        *two_process_launcher(),
        "trainer",
        "train",
        "--config",
        str(REPO / "configs/demo.yaml"),
        "train.epochs=1",
        "train.precision=fp32",
        "train.log_every_steps=1",
        "data.max_train_samples=64",
        "data.max_val_samples=64",
        f"output.dir={out}",
        f"output.run_name=launch{index}",
        "output.plots=false",
        "output.progress=log",
    ]
    marker = f"{os.getpid()}-{index}"
    env = {
        **os.environ,
        "PYTHONPATH": pythonpath,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "STRESS_LAUNCH": marker,
    }
    start = time.perf_counter()
    first_step: list[float] = []
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )

    def read() -> None:
        for line in proc.stderr:
            if not first_step and " step 1/" in line:
                first_step.append(time.perf_counter() - start)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=hang_s)
        hung = False
    except subprocess.TimeoutExpired:
        kill_marked("STRESS_LAUNCH", marker)  # torchrun starts its workers in sessions of their own
        rc, hung = proc.wait(), True
    reader.join(timeout=5)
    return {
        "rc": rc,
        "hung": hung,
        "wall_s": time.perf_counter() - start,
        "first_step_s": first_step[0] if first_step else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launches", type=int, default=20)
    parser.add_argument("--hang-s", type=float, default=300.0, help="a launch still running after this long is a hang")
    parser.add_argument("--pythonpath", default=str(REPO), help="checkout whose trainer the launches import")
    parser.add_argument("--json", default=None, help="also write every launch's figures here")
    args = parser.parse_args()
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="stress-") as tmp:
            for i in range(args.launches):
                runs.append(one_launch(i, Path(tmp), args.pythonpath, args.hang_s))
                print(json.dumps({"launch": i, **runs[-1]}), flush=True)
    finally:
        competitor.kill()
    finished = [r for r in runs if r["rc"] == 0]
    walls = [r["wall_s"] for r in finished]
    starts = [r["first_step_s"] for r in runs if r["first_step_s"] is not None]
    summary = {
        "launches": len(runs),
        "finished": len(finished),
        "hangs": sum(r["hung"] for r in runs),
        "failed": sum(1 for r in runs if r["rc"] != 0 and not r["hung"]),
        "median_wall_s": statistics.median(walls) if walls else None,
        "worst_wall_s": max(walls) if walls else None,
        "median_first_step_s": statistics.median(starts) if starts else None,
        "worst_first_step_s": max(starts) if starts else None,
    }
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "launches": runs}, indent=2))


if __name__ == "__main__":
    main()
