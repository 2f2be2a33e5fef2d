"""Fine-tuning against training from scratch, on the demo's embedded digits: epochs to a val top-1.

    python benchmarks/finetune_demo.py --target 0.9 --epochs 6 --out benchmarks/finetune_demo.json

The digits are split by class: a model is trained on digits 0-4 (configs/demo.yaml,
`--pretrain-epochs`), then the same architecture learns digits 5-9 twice, for `--epochs`
epochs each: once fine-tuned from the first run's directory (configs/finetune.yaml:
`model.pretrained`, `optim.layer_decay`; the 5-class head is re-initialised), once from
scratch (configs/demo.yaml, the recipe tuned for that). Both validate every epoch; the
script reports, for each, the first epoch whose val top-1 reaches `--target`.

Every run is fp32 (`train.precision: fp32`), so machines with and without native bf16 give
the same numbers; accuracies and epoch counts do not depend on the machine's load, the
wall times printed do.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, machine  # a sibling module: these scripts run as benchmarks/<name>.py

from trainer.data.digits import CLASS_NAMES, write_digits
from trainer.metrics import read_metrics

COMMON = ["train.precision=fp32", "output.plots=false", "output.progress=log", "train.eval_every_epochs=1"]
PRETRAIN_CLASSES, FINETUNE_CLASSES = CLASS_NAMES[:5], CLASS_NAMES[5:]
THRESHOLDS = (0.8, 0.9, 0.95)  # also reported, so the target is not the only one shown


def class_subset(digits: Path, classes: list[str], root: Path) -> Path:
    """An ImageNet-layout folder holding only `classes`, as links into the digits folder."""
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for name in classes:
            (root / split / name).symlink_to(digits / split / name, target_is_directory=True)
    return root


def train(config: str, out: Path, name: str, overrides: list[str]) -> tuple[list[dict], float]:
    """One `trainer train` run; its per-epoch records and its wall time."""
    cmd = [sys.executable, "-m", "trainer", "train", "--config", str(REPO / "configs" / config)]
    cmd += [f"output.dir={out}", f"output.run_name={name}", *COMMON, *overrides]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"finetune_demo: {' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return read_metrics(out / name), time.monotonic() - start


def epochs_to(rows: list[dict], target: float) -> int | None:
    """The first epoch (counted from 1) whose val top-1 reaches `target`; None if none does."""
    return next((r["epoch"] + 1 for r in rows if r.get("val_top1", -1) >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=float, default=0.9, help="val top-1 to reach")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each run on digits 5-9")
    parser.add_argument("--pretrain-epochs", type=int, default=4, help="epochs on digits 0-4")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()

    results: dict = {"machine": machine(), "target_val_top1": args.target, "common": COMMON}
    with tempfile.TemporaryDirectory(prefix="finetune_demo-") as tmp:
        out = Path(tmp)
        digits = write_digits(out / "digits")
        pre = class_subset(digits, PRETRAIN_CLASSES, out / "pre")
        fine = class_subset(digits, FINETUNE_CLASSES, out / "fine")
        data = ["data.create_if_missing="]
        pretrain_overrides = [*data, f"data.root={pre}", f"train.epochs={args.pretrain_epochs}"]
        rows, wall = train("demo.yaml", out, "pretrain", pretrain_overrides)
        top1 = [r.get("val_top1") for r in rows]
        results["pretrain"] = {"classes": PRETRAIN_CLASSES, "config": "configs/demo.yaml", "val_top1": top1}
        results["pretrain"]["wall_s"] = round(wall, 1)
        print(f"pretrain on digits 0-4: val top-1 {top1[-1]:.4f}, {wall:.0f} s", flush=True)
        runs = {
            "finetuned": ("finetune.yaml", [f"model.pretrained={out / 'pretrain'}"]),
            "scratch": ("demo.yaml", []),
        }
        for name, (config, extra) in runs.items():
            rows, wall = train(config, out, name, [*data, f"data.root={fine}", f"train.epochs={args.epochs}", *extra])
            reached = epochs_to(rows, args.target)
            results[name] = {
                "classes": FINETUNE_CLASSES,
                "config": f"configs/{config}",
                "overrides": extra and ["model.pretrained=<the pretrain run>"],
                "epochs_to_target": reached,
                "epochs_to": {str(t): epochs_to(rows, t) for t in THRESHOLDS},
                "epochs": [{k: r.get(k) for k in ("epoch", "val_top1", "val_loss", "train_loss")} for r in rows],
                "wall_s": round(wall, 1),
            }
            last = rows[-1]["val_top1"]
            print(f"{name}: {args.target} at epoch {reached}; last val top-1 {last:.4f}, {wall:.0f} s", flush=True)

    print("\n| epoch | fine-tuned val top-1 | from scratch val top-1 |\n| --- | --- | --- |")
    for a, b in zip(results["finetuned"]["epochs"], results["scratch"]["epochs"]):
        print(f"| {a['epoch'] + 1} | {a['val_top1']:.3f} | {b['val_top1']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
