"""`trainer bench`: model step, input pipeline and both together, and which one bounds training.

Three measurements on the configured device, data and switches, all through the objects
`Trainer(cfg)` builds (Accelerator, prepared model, optimizer and train loader):

1. model step: `Trainer.train_step` (forward, backward, the optimizer-step boundary) on a synthetic
   batch already on the device, shaped and typed as the loader's (uint8 with `loader.normalize_on_device`), so forward,
   backward and the optimizer step run with the config's precision, channels_last and
   compile, and nothing waits for data;
2. input pipeline: the real train loader alone (read, decode, augment, collate, place
   on the device), so its img/s is what `loader.workers` processes deliver;
3. end to end: `train_step` over the real loader, as `Trainer.train_epoch` runs it.

Where the device plugin counts host<->device traffic (`Backend.transfer_stats`: the
emulated MLU of the tests does), a few more untimed end-to-end steps give the copies,
bytes and host syncs per step.

Each figure is a median over bounded steps after a warm-up, timed with `backend.timer()`,
which syncs the device before reading the clock. They run in the order 1, 3, 2: the
pipeline alone last, once what its workers prefetched meanwhile is drained.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from trainer.backend import Backend, resolve_precision
from trainer.config import Config
from trainer.data.resize import train_size_at
from trainer.errors import TrainingStopped
from trainer.loop.tally import SUMS
from trainer.metrics import RunningSums
from trainer.traffic import format_traffic, per_step_traffic
from trainer.train import Trainer


def batch_stream(trainer: Trainer) -> Iterator[dict[str, Any]]:
    """The train loader's batches, epoch after epoch, without batches that were all skipped."""
    for epoch in itertools.count():
        trainer.train_loader.set_epoch(epoch)
        if trainer.data.train_sampler is not None:
            trainer.data.train_sampler.set_epoch(epoch)
        usable = 0
        for batch in trainer.train_loader:
            if batch["labels"].numel():
                usable += 1
                yield batch
        if not usable:
            raise TrainingStopped(f"{trainer.cfg.data.root}: an epoch of the train split gave no usable batch")


def train_size(trainer: Trainer, epoch: int) -> int:
    """The train crop of `epoch` (`input.train_size_schedule`), the loader resized to it."""
    trainer.train_loader = trainer.pipeline.resize(epoch, trainer.train_loader)
    return train_size_at(trainer.cfg.input.train_size_schedule, epoch, trainer.data.data_config["input_size"][-1])


def synthetic_batch(trainer: Trainer, size: int) -> dict[str, Any]:
    """A batch as the loader delivers it at `size` px, made on the device: uint8 when normalizing there."""
    loader = trainer.cfg.loader
    batch, device = loader.batch_size_per_device, trainer.accelerator.device
    height = width = size
    num_classes = trainer.data.num_classes(trainer.cfg.model.num_classes)
    if loader.normalize_on_device:
        images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, device=device)
    else:
        images = torch.randn(batch, 3, height, width, device=device)
    return {"images": images, "labels": torch.randint(0, num_classes, (batch,), device=device), "skipped": []}


def time_steps(step: Callable[[], Any], backend: Backend, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls after `warmup` untimed ones; the device is synced around each."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        with backend.timer() as timer:
            step()
        times.append(timer.elapsed_s)
    return times


def summarize(times: list[float], batch: int, window: int = 1) -> dict[str, float]:
    """img/s and the median step time, over windows of `window` consecutive steps.

    NOTE: W loader workers hand over batches in bursts of about W (each finishes one at
    about the same time), so single batch waits alternate between ~0 and a full batch
    time; the median of W-step windows is the steady rate.
    """
    window = max(1, min(window, len(times)))
    means = [sum(times[i : i + window]) / window for i in range(0, len(times) - window + 1, window)]
    step_s = statistics.median(means)
    return {"img_per_s": batch / step_s, "step_s_median": step_s, "steps": len(times)}


def verdict(model: float, pipeline: float, end_to_end: float, trainer: Trainer, cores: int) -> tuple[str, str]:
    """Which side bounds training, and the change that helps: (bound, one-line advice)."""
    cfg, backend = trainer.cfg, trainer.backend
    workers = cfg.loader.workers
    if pipeline < model:
        need = math.ceil(max(workers, 1) * model / pipeline)
        text = (
            f"input-bound: the pipeline gives {pipeline:.1f} img/s with "
            f"{_workers(workers)}, the model takes {model:.1f} img/s: use "
            f"loader.workers={need}"
        )
        if need > cores:
            text += (
                f" (more than the {cores} cores here: keep "
                "loader.normalize_on_device and loader.draft_decode on, `pip "
                "install simplejpeg`, or add cores)"
            )
        bound = "input"
    else:
        hints = []
        if backend.mixed_precision == "no" and resolve_precision("auto", backend.device_type) != "no":
            hints.append(
                f"train.precision=auto ({resolve_precision('auto', backend.device_type)} on this {backend.device_type})"
            )
        if not cfg.train.channels_last:
            hints.append("train.channels_last=true")
        if not cfg.train.compile:
            hints.append("train.compile=true")
        text = (
            f"device-bound: the model takes {model:.1f} img/s, the pipeline "
            f"gives {pipeline:.1f} img/s with {_workers(workers)}: "
        ) + (
            "enable " + ", ".join(hints)
            if hints
            else "every speed switch is on; only a faster device or more devices help"
        )
        if (
            backend.mixed_precision == "no"
            and backend.on_host
            and resolve_precision("auto", backend.device_type) == "no"
        ):
            text += " (this CPU has no native bf16, so fp32 is its fast precision)"
        bound = "device"
    if end_to_end < 0.8 * min(model, pipeline):
        why = (
            f"the loader workers and the model share the {cores} cores"
            if backend.on_host
            else "the loop waits between steps (host syncs or copies)"
        )
        text += f"; end to end reaches only {end_to_end / min(model, pipeline):.0%} of the slower side: {why}"
    return bound, text


def bench_command(cfg: Config, args: argparse.Namespace) -> int:
    """Measure, print a table and a verdict, and write the figures as JSON; returns the exit code."""
    for flag, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--epoch", args.epoch, 0)):
        if value < least:
            print(f"trainer: error: {flag} must be >= {least}, got {value}", file=sys.stderr)
            return 2
    trainer = Trainer(cfg)
    try:
        figures = measure(trainer, args.steps, args.warmup, args.epoch)
    finally:
        trainer.close()
    if trainer.accelerator.is_main_process:
        print(format_table(figures))
        path = Path(args.json) if args.json else cfg.run_dir / "bench.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {path}")
    return 0


def measure(trainer: Trainer, steps: int, warmup: int, epoch: int = 0) -> dict[str, Any]:
    """The three measurements at `epoch`'s train size, and the verdict, as the JSON `trainer bench` writes."""
    cfg, backend = trainer.cfg, trainer.backend
    batch, workers = cfg.loader.batch_size_per_device, cfg.loader.workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sums = RunningSums(trainer.accelerator.device, SUMS)

    size = train_size(trainer, epoch)
    backend.reset_peak_memory()
    synthetic = synthetic_batch(trainer, size)
    model = summarize(time_steps(lambda: trainer.train_step(synthetic, sums), backend, steps, warmup), batch)

    stream = batch_stream(trainer)

    def train_step() -> None:
        trainer.train_step(next(stream), sums)  # the step boundary also steps the scheduler

    end_to_end = summarize(time_steps(train_step, backend, steps, warmup), batch, window=workers)
    # Untimed (the timer's syncs would count), and only where the device plugin counts.
    traffic = per_step_traffic(train_step, backend, steps)

    # NOTE: the workers kept loading while the last steps ran: drain what they prefetched
    # in the warm-up (cheap here, no model step), or the first timed batches come for free.
    drain = cfg.loader.prefetch_factor * workers
    pipeline = summarize(time_steps(lambda: next(stream), backend, steps, warmup + drain), batch, window=workers)
    pipeline["img_per_s_per_worker"] = pipeline["img_per_s"] / max(workers, 1)
    pipeline["img_per_s_per_core"] = pipeline["img_per_s"] / min(max(workers, 1), cores)
    stream.close()

    bound, advice = verdict(model["img_per_s"], pipeline["img_per_s"], end_to_end["img_per_s"], trainer, cores)
    t = cfg.train
    return {
        "setup": {
            "model": cfg.model.name,
            "device": str(backend.device),
            "processes": backend.num_processes,
            "precision": backend.precision,
            "channels_last": t.channels_last,
            "compile": t.compile,
            "batch_size_per_device": batch,
            "img_size": size,
            "epoch": epoch,
            "scheduled": bool(cfg.input.train_size_schedule),
            "workers": workers,
            "cores": cores,
            "normalize_on_device": cfg.loader.normalize_on_device,
            "draft_decode": cfg.loader.draft_decode,
            "steps": steps,
            "warmup": warmup,
        },
        "model_step": model,
        "input_pipeline": pipeline,
        "end_to_end": end_to_end,
        "peak_memory_mib": backend.peak_memory_bytes() / 2**20 if not backend.on_host else None,
        "bound": bound,
        "verdict": advice,
        "traffic_per_step": traffic,
    }


def _workers(count: int) -> str:
    return "0 workers (in the main process)" if count == 0 else f"{count} worker{'s' if count > 1 else ''}"


def format_table(figures: dict[str, Any]) -> str:
    s = figures["setup"]
    pipe = figures["input_pipeline"]
    rows = [
        (
            "model step",
            figures["model_step"],
            f"synthetic batch on {s['device']}, {s['precision']}"
            + (", channels_last" if s["channels_last"] else "")
            + (", compiled" if s["compile"] else ""),
        ),
        (
            "input pipeline",
            pipe,
            f"{_workers(s['workers'])}: {pipe['img_per_s_per_worker']:.1f} "
            f"img/s per worker, {pipe['img_per_s_per_core']:.1f} per core",
        ),
        ("end to end", figures["end_to_end"], "train_step over the real loader"),
    ]
    scheduled = f" (epoch {s['epoch']} of input.train_size_schedule)" if s.get("scheduled") else ""
    lines = [
        f"{s['model']} {s['img_size']}px{scheduled}, batch "
        f"{s['batch_size_per_device']}/device, median of {s['steps']} "
        f"steps after {s['warmup']} warm-up",
        f"{'measurement':<16}{'img/s':>10}{'ms/step':>10}  notes",
    ]
    lines += [f"{name:<16}{f['img_per_s']:>10.1f}{f['step_s_median'] * 1e3:>10.1f}  {note}" for name, f, note in rows]
    if figures.get("peak_memory_mib") is not None:
        lines.append(f"peak device memory: {figures['peak_memory_mib']:.0f} MiB")
    if figures.get("traffic_per_step"):
        lines.append(
            f"device traffic per step (train_step over the loader): {format_traffic(figures['traffic_per_step'])}"
        )
    lines.append(f"bound: {figures['bound']}: {figures['verdict']}")
    return "\n".join(lines)
