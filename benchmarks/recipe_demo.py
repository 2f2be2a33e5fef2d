"""The demo with the modern-recipe pieces on: raw against EMA weights, and an exact resume after a kill.

    python benchmarks/recipe_demo.py --epochs 4 --ema 0.995:warmup 0.98:warmup --kill-at-step 200

Each `--ema DECAY[:warmup][:everyN]` setting is one uninterrupted run of configs/demo.yaml
with EMA + mixup/cutmix + BCE + repeated augmentation + gradient clipping switched on
(`RECIPE` below, fp32 so both CPU kinds give the same numbers). The table printed and
written to `--out` has, per epoch, val top-1 of the raw and of the EMA weights, train top-1
(the dominant class of each mixed image) and the mean gradient norm before clipping, and
the val loss of both.

With `--kill-at-step N`, the first setting is run once more with a checkpoint every
`--checkpoint-every` steps, killed with SIGKILL (the whole process tree) as soon as the
checkpoint of step N exists, then resumed with `train.resume=auto`; the script reports
whether its model.safetensors, model_ema.safetensors and per-epoch metrics are identical
to the uninterrupted run's. Run it alone on the machine: the wall times it prints are
worthless while anything else trains.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import machine  # a sibling module: these scripts run as benchmarks/<name>.py
from safetensors.torch import load_file

from trainer.checkpoint import checkpoint_name
from trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
RECIPE = [
    "mixup.mixup_alpha=0.1",
    "mixup.cutmix_alpha=1.0",
    "train.loss=bce",
    "train.bce_target_threshold=0.2",
    "aug.repeated_aug=3",
    "train.grad_clip_norm=1.0",
    "train.precision=fp32",
    "output.plots=false",
    "output.progress=log",
]


def parse_ema(text: str) -> list[str]:
    """'0.995:warmup:every4' -> the ema.* overrides it names."""
    decay, *flags = text.split(":")
    overrides = ["ema.enabled=true", f"ema.decay={float(decay)}", f"ema.warmup={'warmup' in flags}"]
    for flag in flags:
        if flag.startswith("every"):
            overrides.append(f"ema.every_steps={int(flag[len('every') :])}")
        elif flag != "warmup":
            raise SystemExit(f"recipe_demo: --ema {text!r}: unknown flag {flag!r} (warmup, everyN)")
    return overrides


def train_command(out: Path, name: str, epochs: int, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainer",
        "train",
        "--config",
        str(REPO / "configs/demo.yaml"),
        f"train.epochs={epochs}",
        f"output.dir={out}",
        f"output.run_name={name}",
        *RECIPE,
        *overrides,
    ]


def run(cmd: list[str]) -> float:
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"recipe_demo: {' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return time.monotonic() - start


def run_until_checkpoint(cmd: list[str], checkpoint: Path, limit_s: float = 1800) -> float:
    """Starts `cmd` in its own session and SIGKILLs the whole session once `checkpoint` exists."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not checkpoint.is_dir():
            if proc.poll() is not None:
                raise SystemExit(f"recipe_demo: the run ended (exit {proc.returncode}) before {checkpoint} was written")
            if time.monotonic() - start > limit_s:
                raise SystemExit(f"recipe_demo: no {checkpoint} after {limit_s:.0f} s")
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the loader workers share the session
        proc.wait()
    return time.monotonic() - start


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


EPOCH_KEYS = ("val_top1", "val_top1_ema", "val_loss", "val_loss_ema", "train_top1", "grad_norm")


def epoch_rows(run_dir: Path) -> list[dict]:
    return [{"epoch": r["epoch"], **{k: r.get(k) for k in EPOCH_KEYS}} for r in read_metrics(run_dir)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--ema", nargs="+", default=["0.995:warmup"], help="DECAY[:warmup][:everyN], one run each")
    parser.add_argument(
        "--kill-at-step", type=int, default=0, help="also kill and resume the first setting's run there"
    )
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()

    results = {"machine": machine(), "epochs": args.epochs, "recipe": RECIPE, "runs": []}
    with tempfile.TemporaryDirectory(prefix="recipe_demo-") as tmp:
        out = Path(tmp)
        for index, setting in enumerate(args.ema):
            name = f"ema{index}"
            wall = run(train_command(out, name, args.epochs, parse_ema(setting)))
            rows = epoch_rows(out / name)
            results["runs"].append({"ema": setting, "wall_s": round(wall, 1), "epochs": rows})
            last = rows[-1]
            print(
                f"ema {setting}: top-1 raw {last['val_top1']:.4f} ema "
                f"{last['val_top1_ema']:.4f}, loss raw {last['val_loss']:.4f} ema "
                f"{last['val_loss_ema']:.4f}, {wall:.0f} s",
                flush=True,
            )

        if args.kill_at_step:
            setting = args.ema[0]
            # NOTE: 3 kept: the kill lands within `--checkpoint-every` steps of step N, long
            # before N is pruned; every step's checkpoint kept filled 25 GB of disk.
            overrides = [
                *parse_ema(setting),
                f"train.checkpoint_every_steps={args.checkpoint_every}",
                "train.keep_last_checkpoints=3",
            ]
            straight_cmd = train_command(out, "straight", args.epochs, overrides)
            run(straight_cmd)
            killed = train_command(out, "killed", args.epochs, overrides)
            killed_after = run_until_checkpoint(
                killed, out / "killed" / "checkpoints" / checkpoint_name(args.kill_at_step)
            )
            run([*killed, "train.resume=auto"])
            straight, resumed = out / "straight", out / "killed"
            results["resume"] = {
                "ema": setting,
                "killed_at_step": args.kill_at_step,
                "killed_after_s": round(killed_after, 1),
                "model_identical": same_weights(straight / "model.safetensors", resumed / "model.safetensors"),
                "ema_identical": same_weights(straight / "model_ema.safetensors", resumed / "model_ema.safetensors"),
                "metrics_identical": epoch_rows(straight) == epoch_rows(resumed),
            }
            print(f"resume: {results['resume']}", flush=True)

    m = results["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, native bf16: {m['native_bf16']}; these runs fp32")
    print(
        "| EMA setting | epoch | val top-1 raw | val top-1 EMA | val "
        "loss raw | val loss EMA | train top-1 | grad norm |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results["runs"]:
        for row in r["epochs"]:
            cells = [f"{row[k]:.3f}" if row[k] is not None else "-" for k in EPOCH_KEYS]
            print(f"| {r['ema']} | {row['epoch'] + 1} | {' | '.join(cells)} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
