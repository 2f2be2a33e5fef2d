"""Trainer: setup, train_step, train_epoch, evaluate, fit, close, over Accelerate.

The side mechanisms are components in `trainer/loop/`: the optimizer-step boundary and
its hooks (`OptimizerStep`), the lockstep of uneven stream shards (`Lockstep`, `StandIn`),
the non-finite guard and the stop agreement between processes.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DataLoaderConfiguration, set_seed

from trainer.backend import create_accelerator
from trainer.batch_augment import create_batch_augment
from trainer.checkpoint import CheckpointError, CheckpointManager, TrainState, checkpoint_name
from trainer.config import Config, config_to_dict
from trainer.data.loader import create_datasets
from trainer.data.pipeline import create_pipeline
from trainer.ema import EMA_WEIGHTS, EmaStepHook, create_ema
from trainer.errors import TrainingStopped
from trainer.evaluate import evaluate
from trainer.loop.clip import GradClip
from trainer.loop.lockstep import Lockstep, StandIn, is_empty
from trainer.loop.nonfinite import NonFiniteGuard
from trainer.loop.step import OptimizerStep
from trainer.loop.stop import StopAgreement
from trainer.loop.tally import EpochTally
from trainer.loss import create_loss, hard_labels
from trainer.metrics import RunningSums, topk_correct
from trainer.model import create_model
from trainer.optim import create_lr_scheduler, create_optimizer, zero_fused_momentum
from trainer.progress import EpochProgress, check_trackers
from trainer.run_dir import RunDirectory
from trainer.summary import end_summary, flat_config, start_summary

log = logging.getLogger("trainer")

__all__ = ["Trainer", "TrainingStopped"]


class Trainer:
    """One training run: `Trainer(cfg).fit()` trains, validates, checkpoints and exports."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.run_dir, t = cfg, cfg.run_dir, cfg.train
        check_trackers(cfg.output.log_with, cfg.source)
        self.accelerator, self.backend = create_accelerator(
            cfg.backend.device,
            t.precision,
            cfg.backend.host_memory,
            cfg.backend.collective_timeout_s,
            gradient_accumulation_steps=t.grad_accum_steps,
            log_with=cfg.output.log_with or None,
            project_dir=str(self.run_dir),
            dataloader_config=DataLoaderConfiguration(non_blocking=True),
        )
        acc = self.accelerator
        set_seed(t.seed)
        with acc.main_process_first():
            self.data = create_datasets(
                **cfg.data_sections(),
                model_name=cfg.model.name,
                seed=t.seed,
                rank=acc.process_index,
                world_size=acc.num_processes,
                num_classes=cfg.model.num_classes,
            )
        self.data.check_val_size(acc.num_processes, config_file=cfg.source, root=cfg.data.root)
        num_classes = self.data.num_classes(cfg.model.num_classes)
        model = create_model(cfg.model, num_classes)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # NOTE: with a loss scaler only a fused optimizer skips an overflowing step on the
        # device; any other makes GradScaler call .item() on its inf check every step.
        fused = acc.scaler is not None and self.backend.supports_fused_optimizer()
        optimizer = create_optimizer(model, cfg.optim, prefer_fused=fused)
        # a stuck loader worker is named too, not waited for
        self.pipeline = create_pipeline(
            self.data,
            loader=cfg.loader,
            input=cfg.input,
            aug=cfg.aug,
            accelerator=acc,
            pin_kwargs=self.backend.pin_memory_kwargs(cfg.loader.pin_memory),
            channels_last=t.channels_last,
            wait_s=cfg.backend.collective_timeout_s,
        )
        self.train_loader, self.val_loader, self.normalize = self.pipeline.train, self.pipeline.val, self.pipeline.normalize
        if t.compile:
            model = torch.compile(model)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        zero_fused_momentum(self.optimizer)
        self.steps_per_epoch = self._steps_per_epoch()
        self.scheduler = create_lr_scheduler(self.optimizer, cfg.schedule, self.steps_per_epoch, t.epochs)
        # Recipe components, each None when its keys leave it off: random erasing and
        # mixup/cutmix on the device batch, and the loss for the targets they give.
        self.batch_augment = create_batch_augment(
            mixup=cfg.mixup,
            aug=cfg.aug,
            num_classes=num_classes,
            label_smoothing=t.label_smoothing,
            seed=t.seed,
            process_index=acc.process_index,
        )
        soft_targets = self.batch_augment is not None and self.batch_augment.soft_targets
        self.criterion = create_loss(t.loss, t.label_smoothing, t.bce_target_threshold, soft_targets)
        self.checkpoints = CheckpointManager(acc, self.run_dir / "checkpoints", t.keep_last_checkpoints)
        self.run = RunDirectory(cfg, acc)
        self.state = TrainState()
        self.boundary = OptimizerStep(acc, self.model, self.optimizer, self.scheduler, self.state)
        self.clip = GradClip(acc, self.model, t.grad_clip_norm) if t.grad_clip_norm else None
        self.ema = create_ema(cfg.ema, acc.unwrap_model(self.model))
        for hook in (self.clip, self.ema and EmaStepHook(self.ema, acc.unwrap_model(self.model))):
            if hook:
                self.boundary.add_hook(hook)
        self.tally = EpochTally(acc, self.clip)
        self.guard = NonFiniteGuard(acc.device, t.max_non_finite_steps, acc.scaler is not None, self.checkpoints.directory)
        self.stop = StopAgreement(acc, every_step=self.backend.host_sync_is_free)
        self.stand_in = StandIn(self.data.data_config["input_size"], acc.device)

    # -- setup helpers ---------------------------------------------------------------
    def _steps_per_epoch(self) -> int:
        t, per_device = self.cfg.train, self.cfg.loader.batch_size_per_device
        if not self.data.streamed:
            batches = len(self.train_loader)
        else:
            batches = self.data.train_size // (per_device * self.accelerator.num_processes)
            if not batches and not t.max_steps_per_epoch:
                raise TrainingStopped("data.streaming: the split size is unknown; set train.max_steps_per_epoch")
        steps = math.ceil(batches / t.grad_accum_steps) if batches else t.max_steps_per_epoch
        if steps == 0:
            raise TrainingStopped(
                f"{self.cfg.data.root}: {self.data.train_size} training images give no full batch of {per_device} per device on {self.accelerator.num_processes} processes"
            )
        return min(steps, t.max_steps_per_epoch) if t.max_steps_per_epoch else steps

    def resume(self) -> None:
        """Continue from `train.resume`: the newest complete checkpoint that loads."""
        candidates = self.checkpoints.resolve(self.cfg.train.resume)
        for path in candidates:
            try:
                state = self.checkpoints.load(path)
            except CheckpointError as err:
                log.warning("skipping checkpoint: %s", err)
                continue
            vars(self.state).update(vars(state))  # in place: the step boundary holds this object
            self.scheduler.load_state_dict(self.state.scheduler)
            if self.ema is not None and not self.ema.load(path):
                log.warning("%s has no %s: the EMA starts from the resumed weights", path, EMA_WEIGHTS)
                self.ema.reset_to(self.accelerator.unwrap_model(self.model))
            log.info("resumed from %s (epoch %d, step %d)", path, self.state.epoch + 1, self.state.global_step)
            if self.accelerator.is_main_process:  # the resumed run writes them again
                self.run.metrics.drop_from_epoch(self.state.epoch)
                self.run.metrics.drop_after_step(self.state.global_step)
            return
        if candidates:
            # NOTE: a failed load may already have put its weights in the model (Accelerate
            # loads the model before the optimizer): never train on from those as if fresh.
            raise CheckpointError(
                f"train.resume={self.cfg.train.resume}: none of the {len(candidates)} checkpoints in {self.checkpoints.directory} could be loaded; move them away to start fresh"
            )
        if self.accelerator.is_main_process:
            self.run.metrics.drop_from_epoch(0)  # records of a run killed before its first checkpoint: it starts again

    # -- the loop --------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any], sums: RunningSums) -> bool:
        """One micro-batch: forward, backward and (at accumulation boundaries) the update; True when it updated.

        A batch whose every image was skipped still steps when there are several processes,
        on a stand-in with its loss weighted 0: the gradient all-reduce, the optimizer step
        and the schedule must stay in lockstep across processes, and this process then adds
        nothing to the gradient, the loss or the accuracy.
        """
        stand_in = is_empty(batch)
        if stand_in:
            batch = self.stand_in.batch()
        else:
            self.stand_in.remember(batch)
        images, labels = self.normalize(batch["images"]), batch["labels"]
        targets = labels
        if self.batch_augment is not None:  # seeded by the micro-batch's place in the epoch: exact on resume
            images, targets = self.batch_augment(images, labels, self.state.epoch, self.state.batches_done)
        with self.boundary.accumulate():
            with self.accelerator.autocast():
                logits = self.model(images)
                loss = self.criterion(logits, targets)
                if stand_in:
                    loss = loss * 0.0
            updated = self.boundary.backward(loss)
        if not stand_in:
            (top1,) = topk_correct(logits.detach(), hard_labels(targets), (1,))  # mixed: the dominant image's class
            n = labels.new_full((), labels.numel())  # made on the device: torch.tensor(..., device=) is a blocking copy
            sums.add(loss.detach() * n, top1.sum(), n)
            self.guard.observe(loss)
        return updated

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch (or its rest, after a resume); returns its metrics, reduced over processes."""
        t, state, tally = self.cfg.train, self.state, self.tally
        batches = self._epoch_batches(epoch)
        step_in_epoch = math.ceil(state.batches_done / t.grad_accum_steps)
        progress = EpochProgress(epoch, t.epochs, self.steps_per_epoch, step_in_epoch, *self._shown())
        tally.start(state.epoch_totals if state.batches_done else {})
        start_s = window_s = time.perf_counter()
        for batch in batches:
            tally.skipped += self.run.record_skipped(batch["skipped"]) if batch["skipped"] else 0
            state.batches_done += 1
            if is_empty(batch) and self.accelerator.num_processes == 1:  # all skipped; several processes step on together
                continue
            if not self.train_step(batch, tally.window):
                continue  # inside an accumulation window
            step_in_epoch += 1
            stats = None
            if step_in_epoch % t.log_every_steps == 0 or step_in_epoch == self.steps_per_epoch:
                stats, window_s = self._read_window(time.perf_counter() - window_s), time.perf_counter()
            progress.update(1, stats)
            if self._checkpoint_due(step_in_epoch):
                state.epoch_totals = tally.snapshot()
                self._save_checkpoint()
            if self.stop.epoch_over(state.global_step, batches.ended, at_log_point=stats is not None) or step_in_epoch >= self.steps_per_epoch:
                break
        progress.close()
        # NOTE: kept in the state, so a stop checkpoint taken now resumes with them too
        metrics, state.epoch_totals = tally.epoch_metrics(time.perf_counter() - start_s)
        self.guard.check(state.global_step)
        return metrics

    def _shown(self) -> tuple[bool, str]:
        """Whether this process shows progress, and how (`output.progress`)."""
        return self.accelerator.is_main_process, self.cfg.output.progress

    def _checkpoint_due(self, step_in_epoch: int) -> bool:
        """`train.checkpoint_every_steps` reached, short of the epoch's end (which checkpoints anyway)."""
        every = self.cfg.train.checkpoint_every_steps
        return bool(every) and self.state.global_step % every == 0 and step_in_epoch < self.steps_per_epoch

    def _epoch_batches(self, epoch: int) -> Lockstep:
        """This epoch's train batches past those already done, padded for uneven stream shards."""
        # NOTE: resized before skipping, so a resumed epoch loads its rest at its own size
        self.train_loader = loader = self.pipeline.resize(epoch, self.train_loader)
        if self.state.batches_done:
            loader = self.accelerator.skip_first_batches(loader, self.state.batches_done)
        loader.set_epoch(epoch)
        if self.data.train_sampler is not None:
            self.data.train_sampler.set_epoch(epoch)
        pad = self.data.streamed and self.accelerator.num_processes > 1
        return Lockstep(loader, pad, epoch, self.state.batches_done, self.steps_per_epoch * self.cfg.train.grad_accum_steps, self.accelerator.process_index)

    def _read_window(self, elapsed_s: float) -> dict[str, float]:
        """Read the loss at log intervals only: this is the loop's one host sync."""
        w = self.tally.read_window()
        self.guard.check(self.state.global_step)
        n, img_per_s = max(w["n"], 1), w["n"] * self.accelerator.num_processes / max(elapsed_s, 1e-9)
        stats = {"loss": w["loss"] / n, "top1": w["top1"] / n, "lr": self.boundary.lr, "img_per_s": img_per_s}
        if self.clip:
            stats["grad_norm"] = self.clip.mean_norm()
        self.run.write_step({"step": self.state.global_step, **stats})
        return stats

    def _save_checkpoint(self) -> None:
        """Checkpoint unless the latest loss or the weights are non-finite: never overwrite good state with NaNs."""
        if self.guard.safe_to_save(self.model, self.state.global_step):
            self.checkpoints.save(self.state, self.scheduler, extra_weights={EMA_WEIGHTS: self.ema.module} if self.ema else None)

    def evaluate(self, num_classes_for_confusion: int = 0) -> dict[str, Any]:
        """Val loss, top-1 and top-5 over every val image exactly once (`trainer.evaluate`)."""
        return evaluate(self.accelerator, self.model, self.val_loader, self.normalize, self.run.record_skipped, num_classes_for_confusion)

    def evaluate_ema(self) -> dict[str, Any]:
        """The same figures for the EMA weights, keyed `val_top1_ema` etc.; {} without an EMA."""
        if self.ema is None:
            return {}
        result = evaluate(self.accelerator, self.ema.module, self.val_loader, self.normalize, len)  # skips were recorded by the raw pass
        self.ema.module.eval()  # NOTE: evaluate leaves a model in train mode; the EMA never trains
        return {f"{k}_ema": v for k, v in result.items() if k not in ("val_samples", "val_skipped")}

    def fit(self) -> dict[str, Any]:
        """Train all epochs; returns the last epoch's metrics."""
        self.run.prepare()
        self.resume()
        self._start_trackers()
        self._log_start()
        fit_start_s, history, record = time.perf_counter(), [], {}
        with self.stop.signals():
            for epoch in range(self.state.epoch, self.cfg.train.epochs):
                self.state.epoch = epoch
                record = {"epoch": epoch, **self.train_epoch(epoch)}
                if self.stop.requested:
                    return self._stop_now(record)
                if epoch + 1 == self.cfg.train.epochs or (epoch + 1) % self.cfg.train.eval_every_epochs == 0:
                    record.update({**self.evaluate(), **self.evaluate_ema()})
                record.update(step=self.state.global_step, lr=self.boundary.lr)
                self._end_epoch(record)
                history.append(record)
        weights = self.run.export(self.model, classes=self.data.classes, input_config=self.data.data_config)
        if self.ema is not None:
            self.run.export(self.ema.module, classes=self.data.classes, input_config=self.data.data_config, ema=True)
        self._log_end(history, time.perf_counter() - fit_start_s, weights)
        return record

    def _end_epoch(self, record: dict[str, Any]) -> None:
        """Mark the epoch done, note the best checkpoint, write the record, then checkpoint."""
        self.state.epoch, self.state.batches_done, self.state.epoch_totals = record["epoch"] + 1, 0, {}
        if record.get("val_top1", -1) > self.state.best_val_top1:
            self.state.best_val_top1, self.state.best_checkpoint = record["val_top1"], checkpoint_name(self.state.global_step)
        # NOTE: record first, checkpoint second: a kill between them re-runs the epoch
        # and resume() drops the record; the other way round it was lost for good.
        self.run.write_epoch(record)
        self._save_checkpoint()

    def _stop_now(self, record: dict[str, Any]) -> dict[str, Any]:
        self._save_checkpoint()
        log.warning("stop requested: checkpoint saved at step %d; resume with train.resume=auto", self.state.global_step)
        return record

    def _start_trackers(self) -> None:
        if self.cfg.output.log_with:
            self.accelerator.init_trackers(self.run_dir.name, config=flat_config(config_to_dict(self.cfg)))

    def _log_start(self) -> None:
        if self.accelerator.is_main_process:
            log.info("\n" + start_summary(self.cfg, self.backend, self.data, self.accelerator.scaler is not None, self.steps_per_epoch, self.state))

    def _log_end(self, history: list[dict[str, Any]], total_s: float, weights: Path) -> None:
        if self.accelerator.is_main_process and history:
            log.info("done\n" + end_summary(history, total_s, weights, self.checkpoints.directory))

    def close(self) -> None:
        self.accelerator.end_training()
