"""build_training: the accelerator, data, model, optimizer and schedule of a training run.

`Trainer` takes these parts and owns the loop; building them is one list of calls, in the
order their dependencies need (the processes before the batch plan, the data before the
model's class count, the loaders before the steps per epoch, the steps before the schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DataLoaderConfiguration, set_seed

from trainer.backend import Backend, create_accelerator
from trainer.batch_augment import BatchAugment, create_batch_augment
from trainer.config import Config
from trainer.data.loader import Datasets, create_datasets
from trainer.data.pipeline import InputPipeline, create_pipeline
from trainer.errors import TrainingStopped
from trainer.global_batch import BatchPlan, plan_batch
from trainer.loss import create_loss
from trainer.model import create_model
from trainer.optim import create_lr_scheduler, create_optimizer, zero_fused_momentum
from trainer.progress import check_trackers


@dataclass
class TrainingParts:
    accelerator: Any
    backend: Backend
    plan: BatchPlan
    data: Datasets
    pipeline: InputPipeline
    model: torch.nn.Module  # prepared by Accelerate
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int
    batch_augment: BatchAugment | None  # None when mixup, cutmix and erasing are off
    criterion: torch.nn.Module


def build_training(cfg: Config) -> TrainingParts:
    """Every part of a run `Trainer` needs, from the config and the processes it runs on."""
    t = cfg.train
    check_trackers(cfg.output.log_with, cfg.source)
    acc, backend = create_accelerator(
        cfg.backend.device,
        t.precision,
        cfg.backend.host_memory,
        cfg.backend.collective_timeout_s,
        gradient_accumulation_steps=t.grad_accum_steps,
        log_with=cfg.output.log_with or None,
        project_dir=str(cfg.run_dir),
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    plan = plan_batch(
        global_batch_size=cfg.loader.global_batch_size,
        per_device=cfg.loader.batch_size_per_device,
        processes=acc.num_processes,
        grad_accum_steps=t.grad_accum_steps,
        source=cfg.source,
    )
    # NOTE: known only once the processes are: Accelerate reads it per micro-batch (a
    # setter of Accelerator, accelerate/src/accelerate/accelerator.py)
    acc.gradient_accumulation_steps = plan.accumulation
    set_seed(t.seed)
    with acc.main_process_first():
        data = create_datasets(
            **cfg.data_sections(),
            model_name=cfg.model.name,
            seed=t.seed,
            rank=acc.process_index,
            world_size=acc.num_processes,
            num_classes=cfg.model.num_classes,
        )
    data.check_val_size(acc.num_processes, config_file=cfg.source, root=cfg.data.root)
    num_classes = data.num_classes(cfg.model.num_classes)
    model = create_model(cfg.model, num_classes)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # NOTE: with a loss scaler only a fused optimizer skips an overflowing step on the
    # device; any other makes GradScaler call .item() on its inf check every step.
    fused = acc.scaler is not None and backend.supports_fused_optimizer()
    optimizer = create_optimizer(model, cfg.optim, prefer_fused=fused)
    # a stuck loader worker is named too, not waited for
    pipeline = create_pipeline(
        data,
        **cfg.pipeline_sections(),
        accelerator=acc,
        pin_kwargs=backend.pin_memory_kwargs(cfg.loader.pin_memory),
        channels_last=t.channels_last,
        wait_s=cfg.backend.collective_timeout_s,
    )
    if t.compile:
        model = torch.compile(model)
    model, optimizer = acc.prepare(model, optimizer)
    zero_fused_momentum(optimizer)
    steps = steps_per_epoch(cfg, data, plan)
    scheduler = create_lr_scheduler(optimizer, cfg.schedule, steps, t.epochs)
    # Recipe components, each None when its keys leave it off: random erasing and
    # mixup/cutmix on the device batch, and the loss for the targets they give.
    batch_augment = create_batch_augment(
        mixup=cfg.mixup, aug=cfg.aug, num_classes=num_classes, label_smoothing=t.label_smoothing, seed=t.seed
    )
    soft_targets = batch_augment is not None and batch_augment.soft_targets
    criterion = create_loss(t.loss, t.label_smoothing, t.bce_target_threshold, soft_targets)
    return TrainingParts(
        acc, backend, plan, data, pipeline, model, optimizer, scheduler, steps, batch_augment, criterion
    )


def epoch_samples(data: Datasets, plan: BatchPlan) -> int:
    """The epoch's length in samples of its global order (0 when a stream's size is unknown)."""
    if data.train_sampler is not None:
        return data.train_sampler.epoch_samples
    return data.train_size // plan.round_size * plan.round_size


def steps_per_epoch(cfg: Config, data: Datasets, plan: BatchPlan) -> int:
    """Optimizer steps of the global batch per epoch (after `train.max_steps_per_epoch`)."""
    t = cfg.train
    samples = epoch_samples(data, plan)
    if data.streamed and not samples and not t.max_steps_per_epoch:
        raise TrainingStopped("data.streaming: the split size is unknown; set train.max_steps_per_epoch")
    if not samples and not data.streamed:
        raise TrainingStopped(
            f"{cfg.data.root}: {data.train_size} training images give no full batch of {plan.describe()}"
        )
    steps = math.ceil(samples / plan.global_batch) if samples else t.max_steps_per_epoch
    return min(steps, t.max_steps_per_epoch) if t.max_steps_per_epoch else steps
