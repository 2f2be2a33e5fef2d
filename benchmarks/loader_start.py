"""Start-up and per-epoch cost of the loader workers' start method: fork vs the fork server.

Each start method runs in a fresh process (the fork server is one per process), on the
demo's digits folder with the demo's transforms:

    python benchmarks/loader_start.py --workers 2 --samples 256

first batch: from iter(loader) to the first batch (worker start included); epoch: the
rest of the first epoch; next epoch: a second epoch with persistent workers, and with
persistent_workers=False (workers started again).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(method: str, workers: int, samples: int, persistent: bool) -> dict:
    import multiprocessing

    import trainer.data.loader as loader_module
    from trainer.config import load_config
    from trainer.data.loader import create_datasets, create_loader

    if method == "fork":  # what the loaders did before: the default start method on Linux
        loader_module.worker_context = lambda: multiprocessing.get_context("fork")
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [f"loader.workers={workers}", f"data.max_train_samples={samples}", f"loader.persistent_workers={persistent}"],
    )
    data = create_datasets(**cfg.data_sections(), model_name=cfg.model.name, seed=0, rank=0, world_size=1)
    loader = create_loader(
        data.train,
        cfg.loader,
        batch_size=cfg.loader.batch_size_per_device,
        pin_kwargs={"pin_memory": False},
        sampler=data.train_sampler,
        drop_last=True,
    )
    times = {}
    start = time.perf_counter()
    it = iter(loader)
    next(it)
    times["first_batch_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for _ in it:
        pass
    times["epoch_rest_s"] = time.perf_counter() - start
    data.train_sampler.set_epoch(1)
    start = time.perf_counter()
    for _ in loader:
        pass
    times["next_epoch_s"] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PERSISTENT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.workers, args.samples, args.child[1] == "1")))
        return
    rows = {}
    for _ in range(args.repeats):
        for method in ("fork", "forkserver"):
            for persistent in ("1", "0"):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--workers",
                        str(args.workers),
                        "--samples",
                        str(args.samples),
                        "--child",
                        method,
                        persistent,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=REPO,
                ).stdout
                rows.setdefault((method, persistent), []).append(json.loads(out.splitlines()[-1]))
    print(f"{args.workers} workers, {args.samples} samples, batch 16, median of {args.repeats} fresh processes")
    print(f"{'start method':<12} {'persistent':<10} {'first batch s':>13} {'rest of epoch s':>15} {'next epoch s':>12}")
    for (method, persistent), runs in rows.items():
        med = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
        print(
            f"{method:<12} {('yes' if persistent == '1' else 'no'):<10} "
            f"{med['first_batch_s']:>13.2f} {med['epoch_rest_s']:>15.2f} "
            f"{med['next_epoch_s']:>12.2f}"
        )


if __name__ == "__main__":
    main()
