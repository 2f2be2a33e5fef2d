"""The one-screen start and end summaries of a run, and the config flattened for trackers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.backend import Backend
from trainer.checkpoint import TrainState
from trainer.config import Config
from trainer.data.loader import Datasets
from trainer.data.resize import describe_schedule
from trainer.global_batch import BatchPlan, ResumeChange


def start_summary(
    cfg: Config,
    backend: Backend,
    data: Datasets,
    loss_scaler: bool,
    steps_per_epoch: int,
    state: TrainState,
    *,
    plan: BatchPlan,
    change: ResumeChange | None = None,
) -> str:
    """What people check before walking away from a long run; `change`: a resume's other process count or batch."""
    b, d, t = backend, data, cfg.train
    weights_from = f", from {cfg.model.pretrained}" if cfg.model.pretrained else ""
    return _table(
        [
            ("run", str(cfg.run_dir)),
            ("model", f"{cfg.model.name} ({d.num_classes(cfg.model.num_classes)} classes)" + weights_from),
            ("device", processes(b) + (", freed host memory retained" if b.host_memory == "retain" else "")),
            ("precision", b.precision + (" + loss scaler" if loss_scaler else "")),
            ("data", f"{cfg.data.source} {cfg.data.root}: {d.train_size} train / {d.val_size} val images"),
            (
                "input",
                f"{d.data_config['input_size'][-1]}px, "
                f"{d.data_config['interpolation']}, crop_pct "
                f"{d.data_config['crop_pct']}",
            ),
            *(
                [("train size", describe_schedule(cfg.input.train_size_schedule) + " (input.train_size_schedule)")]
                if cfg.input.train_size_schedule
                else []
            ),
            ("batch", f"{plan.describe()}, {steps_per_epoch} steps/epoch"),
            ("schedule", f"{t.epochs} epochs, {cfg.optim.name} lr {cfg.optim.lr}, {cfg.schedule.name}"),
            (
                "start",
                f"epoch {state.epoch + 1}, step {state.global_step}" + (" (resumed)" if state.global_step else ""),
            ),
            *([("resumed from", change.summary())] if change else []),
        ]
    )


def processes(backend: Backend) -> str:
    """ "cpu, 1 process, not distributed" or "mlu:0 x 8 process(es), MULTI_MLU, process group cncl"."""
    b = backend
    if b.num_processes == 1:
        return f"{b.device}, 1 process, not distributed"
    return f"{b.device} x {b.num_processes} process(es), {b.distributed_type}, process group {b.process_group_backend}"


def end_summary(history: list[dict[str, Any]], total_s: float, weights: Path, checkpoints: Path) -> str:
    """Best and final val accuracy, time, mean throughput and where the results are."""
    last = history[-1]
    best = max((r for r in history if r.get("val_top1") is not None), key=lambda r: r["val_top1"], default=last)
    mean_img_s = sum(r["train_samples"] for r in history) / max(sum(r["epoch_time_s"] for r in history), 1e-9)
    return _table(
        [
            (
                "best val",
                f"top-1 {best.get('val_top1', float('nan')):.4f} top-5 "
                f"{best.get('val_top5', float('nan')):.4f} (epoch "
                f"{best['epoch'] + 1})",
            ),
            (
                "final val",
                f"top-1 {last.get('val_top1', float('nan')):.4f} top-5 {last.get('val_top5', float('nan')):.4f}",
            ),
            *(
                [
                    (
                        "final val EMA",
                        f"top-1 {last['val_top1_ema']:.4f} top-5 {last.get('val_top5_ema', float('nan')):.4f}",
                    )
                ]
                if last.get("val_top1_ema") is not None
                else []
            ),
            ("time", f"{total_s:.1f} s, {mean_img_s:.1f} img/s mean"),
            ("weights", str(weights)),
            ("checkpoints", str(checkpoints)),
        ]
    )


def flat_config(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tracker-friendly config: `section.key` -> scalar (lists as strings)."""
    return {
        f"{k}.{n}": (v if isinstance(v, (int, float, str, bool)) else str(v))
        for k, d in sections.items()
        for n, v in d.items()
    }


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:>{width}}: {v}" for k, v in rows)
