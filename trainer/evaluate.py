"""evaluate: val loss, top-1 and top-5 over every val image exactly once, on any number of processes.

Also `trainer eval`: a checkpoint's weights on the val split, built from the accelerator,
the model and the val loader alone (no train scan, optimizer or scheduler).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast

from trainer.loop.stop import hold_for_test
from trainer.metrics import RunningSums, reduce_sums, topk_correct

log = logging.getLogger("trainer")


@torch.no_grad()
def evaluate(
    accelerator: Any,
    model: torch.nn.Module,
    loader: Any,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    record_skipped: Callable[[list[str]], int],
    num_classes_for_confusion: int = 0,
    stop_requested: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Validate `model` on `loader`, which shards the val images across processes without padding.

    Per-process sums (and the skipped count) are reduced once at the end, so the figures
    are exact whatever the number of processes; `num_classes_for_confusion` > 0 also
    returns the confusion matrix (true class x predicted class, on the CPU).

    With `stop_requested`, a process asked to stop leaves at its next batch, and the
    result's `stopped` (every process's count, in the same all-reduce as the sums) tells
    all of them that the figures are partial. NOTE: no collective per batch: the shards
    differ in length by up to one batch, so a per-batch agreement would wait for ever on
    the process that has no batch left.
    """
    acc = accelerator
    model = acc.unwrap_model(model)  # NOTE: no DDP collectives, so uneven shards are fine
    if acc.num_processes > 1:
        # DDP syncs buffers at the start of each forward, so after the last step each
        # process holds BatchNorm statistics of its own batch: validate rank 0's, the
        # ones that are exported and checkpointed.
        for buffer in model.buffers():
            buffer.copy_(broadcast(buffer.clone(), from_process=0))
    model.eval()
    sums = RunningSums(acc.device, ("loss", "top1", "top5", "n"))
    k = num_classes_for_confusion
    confusion = torch.zeros(k * k, dtype=torch.int64, device=acc.device) if k else None
    skipped, stopped = 0, 0
    for batch in loader:
        hold_for_test("validation")
        if stop_requested is not None and stop_requested():
            stopped = 1
            break
        if batch["skipped"]:
            skipped += record_skipped(batch["skipped"])
        labels = batch["labels"]
        if labels.numel() == 0:
            continue
        with acc.autocast():
            logits = model(normalize(batch["images"]))
            loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        top1, top5 = topk_correct(logits, labels, (1, 5))
        sums.add(loss, top1.sum(), top5.sum(), torch.tensor(labels.numel(), device=labels.device))
        if confusion is not None:
            confusion += torch.bincount(labels * k + logits.argmax(1), minlength=k * k)
    model.train()
    totals = reduce_sums(acc, sums, skipped, stopped=stopped)
    n = max(totals["n"], 1)
    result = {
        "val_loss": totals["loss"] / n,
        "val_top1": totals["top1"] / n,
        "val_top5": totals["top5"] / n,
        "val_samples": int(totals["n"]),
        "val_skipped": int(totals["skipped"]),
    }
    if stop_requested is not None:
        result["stopped"] = int(totals["stopped"])
    if confusion is not None:
        result["confusion"] = acc.reduce(confusion, "sum").view(k, k).cpu()
    return result


def load_weights(model: torch.nn.Module, checkpoint: str, description: str, ema: bool = False) -> Path:
    """Load a checkpoint directory's model.safetensors (model_ema.safetensors with `ema`), or a
    .safetensors file, into `model`; returns the file.

    Raises:
        ConfigError: when the file is missing or does not fit `model` (`description` names the model).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from trainer.ema import EMA_WEIGHTS
    from trainer.errors import ConfigError

    path = Path(checkpoint).expanduser()
    weights = path / (EMA_WEIGHTS if ema else "model.safetensors") if path.is_dir() else path
    if not weights.is_file():
        raise ConfigError(f"--checkpoint: {weights} not found (give a checkpoint directory or a .safetensors file)")
    try:
        model.load_state_dict(load_file(str(weights)))
    # another architecture or class count, or not a weights file
    except (RuntimeError, OSError, SafetensorError) as err:
        # torch's second line names the tensor
        detail = " ".join(line.strip() for line in str(err).strip().splitlines()[:2]) or type(err).__name__
        raise ConfigError(f"--checkpoint: {weights} cannot be loaded into {description}: {detail}") from None
    return weights


def eval_command(
    cfg: Any, checkpoint: str, output: str | None, confusion: bool, debug: bool = False, ema: bool = False
) -> dict[str, Any] | None:
    """`trainer eval`: evaluate `checkpoint` (its EMA weights with `ema`) on the val split; write
    eval.json (and plots) and say where.

    Returns the metrics on the main process, None on the others.
    """
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from trainer.backend import create_accelerator
    from trainer.data.loader import create_datasets
    from trainer.data.pipeline import create_pipeline
    from trainer.model import create_model
    from trainer.progress import setup_logging
    from trainer.run_dir import RunDirectory

    acc, backend = create_accelerator(
        cfg.backend.device,
        cfg.train.precision,
        cfg.backend.host_memory,
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    setup_logging(acc.is_main_process, debug)
    set_seed(cfg.train.seed)
    with acc.main_process_first():
        data = create_datasets(
            **cfg.data_sections(),
            model_name=cfg.model.name,
            seed=cfg.train.seed,
            rank=acc.process_index,
            world_size=acc.num_processes,
            num_classes=cfg.model.num_classes,
            train=False,
        )
    data.check_val_size(acc.num_processes, config_file=cfg.source, root=cfg.data.root)
    num_classes = data.num_classes(cfg.model.num_classes)
    model = create_model(cfg.model, num_classes)
    weights = load_weights(model, checkpoint, f"{cfg.model.name} with {num_classes} classes", ema=ema)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    pipeline = create_pipeline(
        data,
        **cfg.pipeline_sections(),
        accelerator=acc,
        pin_kwargs=backend.pin_memory_kwargs(cfg.loader.pin_memory),
        channels_last=cfg.train.channels_last,
        train=False,
    )
    model = acc.prepare(model)
    run = RunDirectory(cfg, acc)
    classes = data.classes
    k = len(classes) if confusion and len(classes) <= 100 else 0
    result = evaluate(acc, model, pipeline.val, pipeline.normalize, run.record_skipped, k)
    matrix = result.pop("confusion", None)
    if acc.is_main_process:
        out = Path(output) if output else cfg.run_dir / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps({"checkpoint": str(weights), **result}, indent=2))
        written = [out / "eval.json"]
        if matrix is not None:
            from trainer.plots import write_confusion_matrix, write_per_class_csv

            written += [
                write_confusion_matrix(matrix, classes, out / "confusion.png"),
                write_per_class_csv(matrix, classes, out / "per_class.csv"),
            ]
        log.info("wrote %s", ", ".join(str(p) for p in written))
    acc.end_training()
    return result if acc.is_main_process else None
