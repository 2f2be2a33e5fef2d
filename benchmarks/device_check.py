"""Every figure a short rental of a GPU or MLU host should produce, in one run under 8 minutes.

`benchmarks/device_check.sh` installs the package and calls this with the time left. Each
phase runs in its own process (Accelerate keeps one state per process) under its own time
limit; a phase that fails or runs out of time is recorded with its reason and the next one
runs. Every figure goes to OUT/device_check.json, and a short table to OUT/table.txt and
stdout. The measurements are `trainer bench`'s own (trainer/bench.py), on the same objects
`Trainer(cfg)` builds:

1. env: `trainer env --json` (device, count, process group, precision, versions);
2. data: an ImageNet-like JPEG folder (500x375, quality 90, ~90 KB, as
   bench_vs_reference.py makes them), unique images hard-linked up to the size the steps need;
3. fast: ResNet50 at batch 256 per device in the device's fast precision (bf16 where
   native, else fp16 with a loss scaler), channels_last, normalize on the device: the
   model step on a synthetic on-device batch, the input pipeline with the machine's cores as
   loader workers, end to end, and end to end as a fraction of the model step (target 85%);
   peak device memory; host<->device traffic per step where the plugin counts it;
4. compiled: the same model step with `train.compile` (compile time included in the phase);
5. recipe: configs/resnet50_imagenet.yaml as written (fp32, batch 128) end to end, the figure
   comparable to the migration guide's;
6. with more than one device: fast and recipe on all of them through `accelerate launch`,
   and the scaling efficiency (img/s on N devices / (N x img/s on one)).

    python benchmarks/device_check.py --out device_check            # on the device host
    python benchmarks/device_check.py --tiny --out /tmp/dc          # seconds, on a CPU (the test)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

IMG_PER_S_TARGET_H100 = 3000  # synthetic bf16 step at batch 256 (issue 14)
END_TO_END_TARGET = 0.85  # end to end / synthetic model step

# Settings: the real run, and a tiny one that exercises every code path on a CPU in seconds.
FULL = {
    "model": "resnet50",
    "img_size": 224,
    "batch": 256,
    "recipe_batch": 128,
    "steps": 10,
    "warmup": 3,
    "unique_images": 512,
    "precision": "auto",
    "device": "auto",
}
TINY = {
    "model": "test_resnet",
    "img_size": 32,
    "batch": 4,
    "recipe_batch": 4,
    "steps": 2,
    "warmup": 1,
    "unique_images": 8,
    "precision": "fp32",
    "device": "cpu",
}
# Seconds each phase may take at most (the whole stays within --budget-s; see plan()).
PHASE_LIMIT_S = {"env": 60, "data": 90, "fast": 150, "compiled": 180, "recipe": 90, "fast_all": 150, "recipe_all": 90}


# -- data -------------------------------------------------------------------------------
def _write_image(args: tuple[int, Path]) -> None:
    import numpy as np
    from bench_vs_reference import natural_image

    index, path = args
    natural_image(np.random.default_rng(index), (500, 375)).save(path, quality=90)


def make_data(root: Path, unique: int, train_images: int, classes: int = 4) -> dict[str, Any]:
    """ROOT/{train,val}/<class>/*.JPEG: `unique` photo-like JPEGs, hard-linked to `train_images` names.

    Decoding and augmenting a link costs what a fresh file does; writing only the unique
    ones keeps the data step at seconds even for 8 devices x 256 images x the steps.
    """
    marker = root / "data.json"
    meta = {"unique": unique, "train_images": train_images, "classes": classes, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == meta:
        return meta
    sources = root / "unique"
    sources.mkdir(parents=True, exist_ok=True)
    jobs = [(i, sources / f"{i:05d}.JPEG") for i in range(unique) if not (sources / f"{i:05d}.JPEG").exists()]
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")  # no torch imported yet
    with context.Pool(min(len(os.sched_getaffinity(0)), 32)) as pool:
        pool.map(_write_image, jobs, chunksize=8)
    for split, count in (("train", train_images), ("val", 2 * classes)):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            link = folder / f"{split}_{i:06d}.JPEG"
            if not link.exists():
                os.link(sources / f"{i % unique:05d}.JPEG", link)
    marker.write_text(json.dumps(meta))
    return meta


def loader_workers(requested: int | None, processes: int) -> int:
    """Loader workers per process: the machine's cores, less one per process for its main thread."""
    if requested is not None:
        return requested
    return max(1, len(os.sched_getaffinity(0)) // processes - 1)


def train_images_needed(s: dict[str, Any], steps: int, warmup: int, processes: int, workers: int) -> int:
    """Train images for one epoch to cover every batch `trainer bench`'s measure() reads.

    End to end (warm-up + steps), the traffic steps, then the pipeline alone (warm-up,
    the workers' prefetch drained, steps): inside one epoch, so no epoch boundary (where
    the workers' prefetch restarts) falls in a timed window.
    """
    batches = 2 * warmup + 3 * steps + 2 * workers + 2  # prefetch_factor 2, the config's default
    return batches * max(s["batch"], s["recipe_batch"]) * processes


# -- one phase, in its own process ----------------------------------------------------------
def phase_config(setting: str, s: dict[str, Any], data: Path, out: Path, workers: int, compile_model: bool):
    from trainer.config import load_config

    common = [
        f"data.root={data}",
        f"input.img_size={s['img_size']}",
        f"loader.workers={workers}",
        f"model.name={s['model']}",
        "model.num_classes=1000",
        f"backend.device={s['device']}",
        f"output.dir={out}",
        f"output.run_name={setting}",
        "output.progress=log",
        "output.plots=false",
    ]
    if setting == "recipe":  # configs/resnet50_imagenet.yaml as written, but for data and workers
        precision = "fp32"
        switches = [f"loader.batch_size_per_device={s['recipe_batch']}"]
    else:
        precision = s["precision"]
        switches = [
            f"loader.batch_size_per_device={s['batch']}",
            "train.channels_last=true",
            "loader.normalize_on_device=true",
            "loader.draft_decode=true",
            f"train.compile={str(compile_model).lower()}",
        ]
    return load_config(
        REPO / "configs" / "resnet50_imagenet.yaml", common + switches + [f"train.precision={precision}"]
    )


def run_phase(args: argparse.Namespace) -> int:
    """Measure one setting with trainer bench's code and write its JSON (main process only)."""
    from trainer.bench import measure, summarize, synthetic_batch, time_steps
    from trainer.metrics import RunningSums
    from trainer.train import Trainer

    s = TINY if args.tiny else FULL
    s = {**s, **({"steps": args.steps} if args.steps else {}), **({"warmup": args.warmup} if args.warmup else {})}
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    workers = loader_workers(args.workers, processes)
    setting = "recipe" if args.phase.startswith("recipe") else "fast"
    cfg = phase_config(
        setting, s, Path(args.data), Path(args.out) / "runs", workers, compile_model=args.phase == "compiled"
    )
    started = time.perf_counter()
    trainer = Trainer(cfg)
    backend = trainer.backend
    try:
        backend.reset_peak_memory()
        if args.phase == "compiled":  # the model step alone: compiling is most of this phase
            sums = RunningSums(trainer.accelerator.device, ("loss", "top1", "n"))
            batch = synthetic_batch(trainer)
            first = time.perf_counter()
            time_steps(lambda: trainer.train_step(batch, sums), backend, 1, 0)  # compiles
            compile_s = time.perf_counter() - first
            figures = {
                "model_step": summarize(
                    time_steps(lambda: trainer.train_step(batch, sums), backend, s["steps"], s["warmup"]),
                    cfg.loader.batch_size_per_device,
                ),
                "compile_s": compile_s,
            }
        else:
            figures = measure(trainer, s["steps"], s["warmup"])
        figures.update(
            peak_memory_bytes=backend.peak_memory_bytes(),
            processes=backend.num_processes,
            workers_per_process=workers,
            precision={"no": "fp32"}.get(backend.mixed_precision, backend.mixed_precision),
            batch_size_per_device=cfg.loader.batch_size_per_device,
            device=str(backend.device),
            phase_s=time.perf_counter() - started,
        )
        for name in ("model_step", "end_to_end", "input_pipeline"):
            if name in figures:  # every process steps in lockstep: the whole machine's rate
                figures[name]["img_per_s_all"] = figures[name]["img_per_s"] * backend.num_processes
        if "end_to_end" in figures:
            figures["end_to_end_vs_model_step"] = (
                figures["end_to_end"]["img_per_s"] / figures["model_step"]["img_per_s"]
            )
    finally:
        trainer.close()
    if trainer.accelerator.is_main_process:
        Path(args.result).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


# -- the orchestrator -----------------------------------------------------------------------
def launch_config(path: Path, device_type: str, processes: int) -> Path:
    """An `accelerate launch` config for `processes` local processes on this device type."""
    from trainer.backend import DISTRIBUTED_TYPES

    on_cpu = device_type == "cpu"
    # NOTE: on the CPU, MULTI_GPU only picks Accelerate's torchrun launcher (MULTI_CPU would
    # go through mpirun); with use_cpu the processes run on the CPU over gloo.
    lines = [
        f"distributed_type: {'MULTI_GPU' if on_cpu else DISTRIBUTED_TYPES[device_type]}",
        "compute_environment: LOCAL_MACHINE",
        "mixed_precision: 'no'",
        "num_machines: 1",
        f"num_processes: {processes}",
        "machine_rank: 0",
        "rdzv_backend: static",
        "same_network: true",
        f"use_cpu: {str(on_cpu).lower()}",
        "main_process_ip: 127.0.0.1",
    ]
    if not on_cpu:
        lines.append("gpu_ids: all")
    path.write_text("\n".join(lines) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_child(name: str, cmd: list[str], limit_s: float, log: Path) -> dict[str, Any]:
    """Run one phase's process under a time limit; its outcome, never an exception."""
    started = time.perf_counter()
    with open(log, "w") as stream:
        # Its own session, so that a timeout ends the loader workers and launched ranks too.
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=limit_s)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timed out after {limit_s:.0f} s"
    outcome = {"status": status, "wall_s": round(time.perf_counter() - started, 1), "log": str(log)}
    if status != "ok":
        outcome["log_tail"] = log.read_text(errors="replace")[-2000:]
    return outcome


def plan(device_count: int) -> list[str]:
    """Phases in order of value: what a one-hour rental must not leave without comes first."""
    phases = ["fast", "recipe", "compiled"]
    if device_count > 1:
        phases[2:2] = ["fast_all", "recipe_all"]
    return phases


def orchestrate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    s = TINY if args.tiny else FULL
    deadline = started + args.budget_s
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cores": len(os.sched_getaffinity(0)),
        "settings": s,
        "budget_s": args.budget_s,
        "phases": {},
    }
    if args.install:
        report["install"] = json.loads(Path(args.install).read_text())
    from host_packages import check  # beside this file

    report["packages"] = check()  # what this Python lacks; every phase runs anyway

    def left() -> float:
        return deadline - time.perf_counter()

    def save() -> None:
        (out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")

    # 1. env
    env = run_child(
        "env",
        [sys.executable, "-m", "trainer", "env", "--json", f"--device={s['device']}", f"--precision={s['precision']}"],
        min(PHASE_LIMIT_S["env"], max(left(), 1)),
        out / "logs" / "env.log",
    )
    report["phases"]["env"] = env
    try:
        report["env"] = json.loads(
            (out / "logs" / "env.log").read_text()[(out / "logs" / "env.log").read_text().index("{") :]
        )
    except ValueError:
        report["env"] = {}
    device_type = report["env"].get("device_type", s["device"])
    count = report["env"].get("device_count", 1) if device_type != "cpu" else 1
    processes = args.processes or count
    save()

    # 2. data: one epoch's worth for the single-process and the all-device phases alike
    steps, warmup = args.steps or s["steps"], args.warmup or s["warmup"]
    images = max(train_images_needed(s, steps, warmup, n, loader_workers(args.workers, n)) for n in {1, processes})
    data = Path(args.data).resolve() if args.data else out / "data"
    t0 = time.perf_counter()
    try:
        report["data"] = {
            **make_data(data, s["unique_images"], images),
            "path": str(data),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        report["phases"]["data"] = {"status": "ok", "wall_s": report["data"]["seconds"]}
    except Exception as err:  # noqa: BLE001 - recorded; nothing below can run without data
        report["phases"]["data"] = {"status": f"failed: {type(err).__name__}: {err}"}
        save()
        print(format_table(report))
        return 1
    save()

    # 3.. the measurements
    limits = {**PHASE_LIMIT_S, **dict(_limit(item) for item in args.phase_limit)}
    for phase in plan(processes):
        limit = min(limits[phase], left())
        if limit < min(20, limits[phase]):
            report["phases"][phase] = {"status": f"skipped: {left():.0f} s of the {args.budget_s} s budget left"}
            continue
        result = out / f"{phase}.json"
        inner = [
            str(Path(__file__).resolve()),
            "--phase",
            phase,
            "--out",
            str(out),
            "--data",
            str(data),
            "--result",
            str(result),
        ]
        inner += (
            ["--tiny"] * args.tiny
            + [f"--steps={args.steps}"] * bool(args.steps)
            + [f"--warmup={args.warmup}"] * bool(args.warmup)
        )
        inner += [f"--workers={args.workers}"] * (args.workers is not None)
        if phase.endswith("_all"):
            config = launch_config(out / "launch.yaml", device_type, processes)
            cmd = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(config),
                "--main_process_port",
                str(_free_port()),
                *inner,
            ]
        else:
            cmd = [sys.executable, *inner]
        outcome = run_child(phase, cmd, limit, out / "logs" / f"{phase}.log")
        if outcome["status"] == "ok" and result.exists():
            outcome["figures"] = json.loads(result.read_text())
        report["phases"][phase] = outcome
        save()
    summarize_report(report)
    report["total_s"] = round(time.perf_counter() - started, 1)
    save()
    table = format_table(report)
    (out / "table.txt").write_text(table + "\n")
    print(table)
    print(f"figures written to {out / 'device_check.json'}")
    return 0


def _limit(item: str) -> tuple[str, float]:
    name, _, seconds = item.partition("=")
    if name not in PHASE_LIMIT_S or not seconds:
        raise SystemExit(f"--phase-limit {item}: expected PHASE=SECONDS with PHASE one of {', '.join(PHASE_LIMIT_S)}")
    return name, float(seconds)


def _figures(report: dict[str, Any], phase: str) -> dict[str, Any] | None:
    return report["phases"].get(phase, {}).get("figures")


def summarize_report(report: dict[str, Any]) -> None:
    """The headline figures, and scaling efficiency where several devices ran."""
    summary: dict[str, Any] = {
        "targets": {
            "h100_synthetic_bf16_img_per_s": IMG_PER_S_TARGET_H100,
            "end_to_end_vs_model_step": END_TO_END_TARGET,
        }
    }
    fast, recipe, compiled = _figures(report, "fast"), _figures(report, "recipe"), _figures(report, "compiled")
    if fast:
        summary["model_step_img_per_s"] = fast["model_step"]["img_per_s"]
        summary["end_to_end_img_per_s"] = fast["end_to_end"]["img_per_s"]
        summary["end_to_end_vs_model_step"] = fast["end_to_end_vs_model_step"]
        summary["end_to_end_target_met"] = fast["end_to_end_vs_model_step"] >= END_TO_END_TARGET
    if compiled and fast:
        summary["compiled_vs_eager"] = compiled["model_step"]["img_per_s"] / fast["model_step"]["img_per_s"]
    if recipe:
        summary["recipe_fp32_end_to_end_img_per_s"] = recipe["end_to_end"]["img_per_s"]
    for phase, single in (("fast_all", fast), ("recipe_all", recipe)):
        multi = _figures(report, phase)
        if multi and single:
            n = multi["processes"]
            summary[f"{phase}_scaling_efficiency"] = {
                name: multi[name]["img_per_s_all"] / (n * single[name]["img_per_s"])
                for name in ("model_step", "end_to_end")
            }
    report["summary"] = summary


def format_table(report: dict[str, Any]) -> str:
    env = report.get("env", {})
    lines = [
        f"device check on {report['host']}: {env.get('device_type', '?')} x {env.get('device_count', '?')}, "
        f"{report['cores']} cores, torch {env.get('versions', {}).get('torch', '?')}, {report['date']}"
    ]
    if "install" in report:
        lines.append(f"install: {report['install'].get('status')} in {report['install'].get('seconds', '?')} s")
    for kind, found in report.get("packages", {}).items():
        lines += [f"{kind.replace('_', ' ')}: {name}: {why}" for name, why in found.items()]
    lines.append(
        f"{'phase':<12}{'status':<10}{'model img/s':>12}{'e2e img/s':>11}{'e2e/model':>10}{'peak GiB':>9}  setting"
    )
    for phase, outcome in report["phases"].items():
        if phase in ("env", "data"):
            continue
        f = outcome.get("figures")
        if not f:
            lines.append(f"{phase:<12}{outcome['status']}")
            continue
        model = f["model_step"]["img_per_s_all"]
        e2e = (
            f"{f['end_to_end']['img_per_s_all']:>11.1f}{f['end_to_end_vs_model_step']:>10.0%}"
            if "end_to_end" in f
            else f"{'-':>11}{'-':>10}"
        )
        setting = f"{f['processes']} x {f['device']}, {f['precision']}, batch {f['batch_size_per_device']}"
        if "compile_s" in f:
            setting += f", compiled in {f['compile_s']:.0f} s"
        lines.append(f"{phase:<12}{'ok':<10}{model:>12.1f}{e2e}{f['peak_memory_bytes'] / 2**30:>9.2f}  {setting}")
    summary = report.get("summary", {})
    for key in ("fast_all_scaling_efficiency", "recipe_all_scaling_efficiency"):
        if key in summary:
            lines.append(
                f"{key.replace('_', ' ')}: model step "
                f"{summary[key]['model_step']:.0%}, end to end "
                f"{summary[key]['end_to_end']:.0%}"
            )
    fast = _figures(report, "fast")
    if fast:
        lines.append(
            "end to end / model step: "
            f"{summary['end_to_end_vs_model_step']:.0%} (target "
            f"{END_TO_END_TARGET:.0%}); bound: {fast['bound']}: "
            f"{fast['verdict']}"
        )
        if fast.get("traffic_per_step"):
            from trainer.traffic import format_traffic

            lines.append("device traffic per step: " + format_traffic(fast["traffic_per_step"]))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="device_check", help="directory for device_check.json, table.txt, logs and data")
    p.add_argument("--budget-s", type=float, default=450, help="seconds for everything after the install")
    p.add_argument(
        "--tiny", action="store_true", help="tiny model and data on the CPU: checks the script, measures nothing"
    )
    p.add_argument("--data", default=None, help="JPEG folder to use or make (default OUT/data)")
    p.add_argument(
        "--processes", type=int, default=0, help="processes for the *_all phases (default: the device count)"
    )
    p.add_argument("--steps", type=int, default=0, help="timed steps per measurement (default 10; tiny 2)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 3; tiny 1)")
    p.add_argument(
        "--workers", type=int, default=None, help="loader workers per process (default: cores / processes - 1)"
    )
    p.add_argument(
        "--phase-limit", action="append", default=[], metavar="PHASE=SECONDS", help="override a phase's time limit"
    )
    p.add_argument("--install", default=None, help="JSON written by device_check.sh about the install")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    return run_phase(args) if args.phase else orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
