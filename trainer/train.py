"""Trainer: setup, train_step, evaluate, fit, close, over Accelerate."""

from __future__ import annotations

import itertools
import logging
import math
import signal
import time
from pathlib import Path
from functools import partial
from typing import Any, Callable, Iterator

import torch
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DataLoaderConfiguration, set_seed

from trainer.backend import create_accelerator
from trainer.batch_augment import create_batch_augment
from trainer.checkpoint import CheckpointError, CheckpointManager, TrainState
from trainer.config import Config, ConfigError, config_to_dict
from trainer.data.loader import create_datasets, create_loader
from trainer.ema import EMA_WEIGHTS, create_ema
from trainer.evaluate import evaluate
from trainer.loss import create_loss, hard_labels
from trainer.metrics import RunningSums, topk_correct
from trainer.model import create_model
from trainer.optim import create_lr_scheduler, create_optimizer
from trainer.progress import EpochProgress, check_trackers
from trainer.run_dir import RunDirectory
from trainer.summary import end_summary, flat_config, start_summary

log = logging.getLogger("trainer")


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the last good checkpoint is kept."""


class Normalizer:
    """uint8 batches -> normalized float on the device; channels_last for conv nets."""

    def __init__(self, mean: tuple, std: tuple, device: torch.device, channels_last: bool) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().sub_(self.mean).div_(self.std)
        return images.contiguous(memory_format=self.memory_format)


class Trainer:
    """One training run: `Trainer(cfg).fit()` trains, validates, checkpoints and exports."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.run_dir = cfg, cfg.run_dir
        t = cfg.train
        check_trackers(cfg.output.log_with, cfg.source)
        self.accelerator, self.backend = create_accelerator(
            cfg.backend.device, t.precision, cfg.backend.host_memory, gradient_accumulation_steps=t.grad_accum_steps,
            log_with=cfg.output.log_with or None, project_dir=str(self.run_dir),
            dataloader_config=DataLoaderConfiguration(non_blocking=True),
        )
        acc = self.accelerator
        set_seed(t.seed)
        with acc.main_process_first():
            self.data = create_datasets(cfg.data, cfg.model.name, t.seed, acc.process_index, acc.num_processes, cfg.model.num_classes)
        if self.data.val_size and self.data.val_size < acc.num_processes:
            raise ConfigError(f"{cfg.source}: {acc.num_processes} processes but only {self.data.val_size} validation images in {cfg.data.root}; launch fewer processes")
        num_classes = cfg.model.num_classes or len(self.data.classes)
        model = create_model(cfg.model, num_classes)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = create_optimizer(model, cfg.optim)
        pin = self.backend.pin_memory_kwargs()
        train_loader = create_loader(self.data.train, cfg.data, cfg.data.batch_size_per_device, pin, self.data.train_sampler, drop_last=True)
        val_loader = create_loader(self.data.val, cfg.data, cfg.data.val_batch_size_per_device or cfg.data.batch_size_per_device, pin)
        if t.compile:
            model = torch.compile(model)
        streamed = self.data.train_sampler is None  # the reader already shards by process
        if not streamed:
            self.model, self.optimizer, self.train_loader = acc.prepare(model, optimizer, train_loader)
        else:  # Accelerate only places the batches
            self.model, self.optimizer = acc.prepare(model, optimizer)
            # NOTE: dispatch_batches=False: by default Accelerate has process 0 read an
            # IterableDataset and hand out slices of its batches, so the other processes'
            # shards would never be read.
            self.train_loader = prepare_data_loader(train_loader, acc.device, num_processes=1, process_index=0, put_on_device=True, non_blocking=True, dispatch_batches=False)
        # NOTE: validation shards without padding (even_batches=False): each image is seen
        # by exactly one process and per-process sums are reduced, so the metrics stay exact
        # even when an undecodable image is skipped.
        self.val_loader = prepare_data_loader(
            val_loader, acc.device, num_processes=1 if streamed else acc.num_processes, process_index=0 if streamed else acc.process_index,
            even_batches=False, put_on_device=True, non_blocking=True, dispatch_batches=False,
        )
        self.steps_per_epoch = self._steps_per_epoch()
        self.scheduler = create_lr_scheduler(self.optimizer, cfg.schedule, self.steps_per_epoch, t.epochs)
        # Recipe components (issue 13), each None when its keys leave it off: erasing and
        # mixup/cutmix on the device batch, the loss for the targets they give, the EMA.
        self.batch_augment = create_batch_augment(cfg.mixup, cfg.data, num_classes, t.label_smoothing, t.seed, acc.process_index)
        soft_targets = self.batch_augment is not None and self.batch_augment.soft_targets
        self.criterion = create_loss(t.loss, t.label_smoothing, t.bce_target_threshold, soft_targets)
        self.ema = create_ema(cfg.ema, acc.unwrap_model(self.model))
        # What follows each optimizer step, in order, called with the step count (1-based).
        self.step_hooks: list[Callable[[int], None]] = []
        if self.ema is not None:
            self.step_hooks.append(partial(self.ema.after_step, acc.unwrap_model(self.model)))
        self.grad_norms = RunningSums(acc.device, ("norm", "steps"))  # this epoch's clipped steps
        self.normalize = Normalizer(self.data.data_config["mean"], self.data.data_config["std"], acc.device, t.channels_last)
        self.checkpoints = CheckpointManager(acc, self.run_dir / "checkpoints", t.keep_last_checkpoints)
        self.run = RunDirectory(cfg, acc)
        self.state = TrainState()
        self.stop_requested = False
        self.nonfinite_streak = torch.zeros((), dtype=torch.int64, device=acc.device)
        self.nonfinite_max = torch.zeros((), dtype=torch.int64, device=acc.device)
        self._last_batch: dict[str, Any] | None = None  # the stand-in for a batch whose every image was skipped
        self._stream_ended = False  # this process's stream shard ran out this epoch

    # -- setup helpers ---------------------------------------------------------------
    def _steps_per_epoch(self) -> int:
        t = self.cfg.train
        if self.data.train_sampler is not None:
            batches = len(self.train_loader)
        else:
            per_step = self.cfg.data.batch_size_per_device * self.accelerator.num_processes
            batches = self.data.train_size // per_step if self.data.train_size else 0
            if not batches and not t.max_steps_per_epoch:
                raise TrainingStopped("data.streaming: the split size is unknown; set train.max_steps_per_epoch")
        steps = math.ceil(batches / t.grad_accum_steps) if batches else t.max_steps_per_epoch
        if steps == 0:
            raise TrainingStopped(f"{self.cfg.data.root}: {self.data.train_size} training images give no full batch of {self.cfg.data.batch_size_per_device} per device on {self.accelerator.num_processes} processes")
        return min(steps, t.max_steps_per_epoch) if t.max_steps_per_epoch else steps

    def resume(self) -> None:
        """Continue from `train.resume`: the newest complete checkpoint that loads."""
        candidates = self.checkpoints.resolve(self.cfg.train.resume)
        for path in candidates:
            try:
                self.state = self.checkpoints.load(path)
            except CheckpointError as err:
                log.warning("skipping checkpoint: %s", err)
                continue
            self.scheduler.load_state_dict(self.state.scheduler)
            if self.ema is not None and not self.ema.load(path):
                log.warning("%s has no %s: the EMA starts from the resumed weights", path, EMA_WEIGHTS)
                self.ema.reset_to(self.accelerator.unwrap_model(self.model))
            log.info("resumed from %s (epoch %d, step %d)", path, self.state.epoch + 1, self.state.global_step)
            if self.accelerator.is_main_process:
                self.run.metrics.drop_from_epoch(self.state.epoch)  # the resumed run writes them again
            return
        if candidates:
            # NOTE: a failed load may already have put its weights in the model (Accelerate
            # loads the model before the optimizer): never train on from those as if fresh.
            raise CheckpointError(f"train.resume={self.cfg.train.resume}: none of the {len(candidates)} checkpoints in {self.checkpoints.directory} could be loaded; move them away to start fresh")

    # -- the loop --------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any], sums: RunningSums) -> None:
        """One micro-batch: forward, backward and (at accumulation boundaries) the update.

        A batch whose every image was skipped still steps when there are several processes,
        on a stand-in with its loss weighted 0: the gradient all-reduce, the optimizer step
        and the schedule must stay in lockstep across processes, and this process then adds
        nothing to the gradient, the loss or the accuracy.
        """
        stand_in = batch["labels"].numel() == 0
        if stand_in:
            batch = self._stand_in_batch()
        else:
            self._last_batch = batch
        images, labels = self.normalize(batch["images"]), batch["labels"]
        targets = labels
        if self.batch_augment is not None:  # seeded by the micro-batch's place in the epoch: exact on resume
            images, targets = self.batch_augment(images, labels, self.state.epoch, self.state.batches_done)
        with self.accelerator.accumulate(self.model):
            with self.accelerator.autocast():
                logits = self.model(images)
                loss = self.criterion(logits, targets)
                if stand_in:
                    loss = loss * 0.0
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and self.cfg.train.grad_clip_norm:
                # NOTE: Accelerate unscales fp16 gradients first, and clips only at the
                # accumulation boundary, on the summed gradient.
                norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip_norm)
                self.grad_norms.add(norm, torch.ones((), device=norm.device))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if stand_in:
            return
        (top1,) = topk_correct(logits.detach(), hard_labels(targets), (1,))  # mixed: the dominant image's class
        n = torch.tensor(labels.numel(), device=labels.device)
        sums.add(loss.detach() * n, top1.sum(), n)
        # Consecutive non-finite losses, counted on the device: read only at log points.
        finite = torch.isfinite(loss.detach())
        self.nonfinite_streak = (self.nonfinite_streak + 1) * (~finite)
        torch.maximum(self.nonfinite_max, self.nonfinite_streak, out=self.nonfinite_max)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        acc, t = self.accelerator, self.cfg.train
        loader = self.train_loader
        if self.state.batches_done:
            loader = acc.skip_first_batches(loader, self.state.batches_done)
        loader.set_epoch(epoch)
        if self.data.train_sampler is not None:
            self.data.train_sampler.set_epoch(epoch)
        step_in_epoch = math.ceil(self.state.batches_done / t.grad_accum_steps)
        progress = EpochProgress(epoch, self.cfg.train.epochs, self.steps_per_epoch, step_in_epoch, acc.is_main_process, self.cfg.output.progress)
        sums = RunningSums(acc.device, ("loss", "top1", "n"))
        window = RunningSums(acc.device, ("loss", "top1", "n"))
        skipped, start_s, window_s = 0, time.perf_counter(), time.perf_counter()
        self.grad_norms.reset()
        self._stream_ended = False
        if self.data.train_sampler is None and acc.num_processes > 1:
            loader = itertools.chain(loader, self._past_the_stream(epoch))
        for batch in loader:
            if batch["skipped"]:
                skipped += self.run.record_skipped(batch["skipped"])
            if batch["labels"].numel() == 0 and acc.num_processes == 1:  # all skipped; several processes step on together
                self.state.batches_done += 1
                continue
            self.train_step(batch, window)
            self.state.batches_done += 1
            if not acc.sync_gradients:
                continue
            self.state.global_step += 1
            step_in_epoch += 1
            self.scheduler.step()
            for hook in self.step_hooks:
                hook(self.state.global_step)
            stats = None
            if step_in_epoch % t.log_every_steps == 0 or step_in_epoch == self.steps_per_epoch:
                stats = self._read_window(window, sums, time.perf_counter() - window_s)
                window_s = time.perf_counter()
            progress.update(1, stats)
            if t.checkpoint_every_steps and self.state.global_step % t.checkpoint_every_steps == 0 and step_in_epoch < self.steps_per_epoch:
                self._fold(window, sums)
                self._save_if_finite()
            if self._epoch_over() or step_in_epoch >= self.steps_per_epoch:
                break
        progress.close()
        self._fold(window, sums)
        self._check_finite()
        elapsed = time.perf_counter() - start_s
        # One collective for the epoch: every process's sums and skip count, added up.
        local = torch.cat([sums.values, torch.tensor([skipped], dtype=sums.values.dtype, device=acc.device)])
        loss, top1, n, skipped_total = acc.reduce(local, "sum").tolist()
        record = {
            "train_loss": loss / max(n, 1), "train_top1": top1 / max(n, 1), "img_per_s": n / elapsed,
            "epoch_time_s": elapsed, "skipped": int(skipped_total), "train_samples": int(n),
        }
        if t.grad_clip_norm:
            record["grad_norm"] = self._mean_grad_norm()
        return record

    def _past_the_stream(self, epoch: int) -> Iterator[dict[str, Any]]:
        """Empty batches after this process's stream shard ran out, until the epoch's last step.

        NOTE: `datasets` gives each process whole shards (files) when they divide evenly,
        and files differ in size: a process whose shard ends first must keep stepping, on
        the stand-in, or the others wait for it in their next all-reduce for ever.
        """
        self._stream_ended = True
        log.warning("epoch %d: process %d's stream shard ran out after %d of the epoch's %d batches; it steps on with its loss weighted 0 so that the processes stay in step",
                    epoch + 1, self.accelerator.process_index, self.state.batches_done, self.steps_per_epoch * self.cfg.train.grad_accum_steps)
        while True:
            yield {"images": torch.empty(0), "labels": torch.empty(0, dtype=torch.int64), "skipped": []}

    def _stand_in_batch(self) -> dict[str, Any]:
        """The last batch this process trained on, or two blank images before the first."""
        if self._last_batch is None:
            size = self.data.data_config["input_size"]
            images = torch.zeros(2, *size, device=self.accelerator.device)  # already normalized: Normalizer keeps floats
            self._last_batch = {"images": images, "labels": torch.zeros(2, dtype=torch.int64, device=self.accelerator.device)}
        return self._last_batch

    def _fold(self, window: RunningSums, sums: RunningSums) -> None:
        sums.values += window.values
        window.reset()

    def _read_window(self, window: RunningSums, sums: RunningSums, elapsed_s: float) -> dict[str, float]:
        """Read the loss at log intervals only: this is the loop's one host sync."""
        w = window.totals()
        self._fold(window, sums)
        self._check_finite()
        n = max(w["n"], 1)
        stats = {"loss": w["loss"] / n, "top1": w["top1"] / n, "lr": self.scheduler.get_last_lr()[0], "img_per_s": w["n"] * self.accelerator.num_processes / max(elapsed_s, 1e-9)}
        if self.cfg.train.grad_clip_norm:
            stats["grad_norm"] = self._mean_grad_norm()
        return stats

    def _mean_grad_norm(self) -> float:
        """The gradient norm before clipping, mean over this epoch's steps so far (the same on every process)."""
        norms = self.grad_norms.totals()
        return norms["norm"] / max(norms["steps"], 1)

    def _check_finite(self) -> None:
        """Stop after too many consecutive non-finite losses; fp16's loss scaler skips them itself."""
        limit = self.cfg.train.max_non_finite_steps
        worst = int(self.nonfinite_max.item())
        if self.accelerator.scaler is None and worst >= limit:
            raise TrainingStopped(f"loss was non-finite for {worst} consecutive steps, up to step {self.state.global_step} (limit train.max_non_finite_steps={limit}); the last good checkpoint is kept in {self.checkpoints.directory}")

    def _save_if_finite(self) -> None:
        """Checkpoint unless the latest loss or the weights are non-finite: never overwrite good state with NaNs."""
        self._check_finite()
        if self.accelerator.scaler is None and int(self.nonfinite_streak.item()):
            log.warning("step %d: loss is non-finite; checkpoint not saved", self.state.global_step)
            return
        # NOTE: an update can overflow weights while the loss it came from was finite; the
        # weights are the same on every process, so all of them skip the (collective) save.
        if not bool(torch.stack([torch.isfinite(p.detach()).all() for p in self.model.parameters()]).all()):
            log.warning("step %d: the weights hold non-finite values; checkpoint not saved", self.state.global_step)
            return
        self.checkpoints.save(self.state, self.scheduler, extra_weights={EMA_WEIGHTS: self.ema.module} if self.ema is not None else None)

    def _epoch_over(self) -> bool:
        """True once SIGTERM/SIGINT arrived, or every process's stream shard has run out.

        Processes agree every 10 steps, when they all ask: a stop asked of one stops all,
        and a stream shard that ran out (`_past_the_stream`) ends the epoch once all have.
        """
        if self.accelerator.num_processes == 1:
            return self.stop_requested
        if self.state.global_step % 10:
            return False
        flags = torch.tensor([int(self.stop_requested), int(self._stream_ended)], device=self.accelerator.device)
        stops, ended = self.accelerator.reduce(flags, "sum").tolist()
        self.stop_requested = stops > 0
        if ended == self.accelerator.num_processes:
            log.info("step %d: every process's stream shard has run out; the epoch ends here", self.state.global_step)
        return self.stop_requested or ended == self.accelerator.num_processes

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
        if self.cfg.output.log_with:
            self.accelerator.init_trackers(self.run_dir.name, config=flat_config(config_to_dict(self.cfg)))
        self._log_start()
        fit_start_s, history = time.perf_counter(), []
        previous = {"SIGTERM": signal.signal(signal.SIGTERM, self._request_stop), "SIGINT": signal.signal(signal.SIGINT, self._request_stop)}
        record: dict[str, Any] = {}
        try:
            for epoch in range(self.state.epoch, self.cfg.train.epochs):
                self.state.epoch = epoch
                record = {"epoch": epoch, **self.train_epoch(epoch)}
                if self.stop_requested:
                    self._save_if_finite()
                    log.warning("stop requested: checkpoint saved at step %d; resume with train.resume=auto", self.state.global_step)
                    return record
                last = epoch + 1 == self.cfg.train.epochs
                if last or (epoch + 1) % self.cfg.train.eval_every_epochs == 0:
                    record.update(self.evaluate())
                    record.update(self.evaluate_ema())
                record.update(step=self.state.global_step, lr=self.scheduler.get_last_lr()[0])
                self.state.epoch, self.state.batches_done = epoch + 1, 0
                name = f"step_{self.state.global_step:08d}"
                if record.get("val_top1", -1) > self.state.best_val_top1:
                    self.state.best_val_top1, self.state.best_checkpoint = record["val_top1"], name
                # NOTE: record first, checkpoint second: a kill between them re-runs the epoch
                # and resume() drops the record; the other way round it was lost for good.
                self.run.write_epoch(record)
                self._save_if_finite()
                history.append(record)
        finally:
            for sig, handler in previous.items():
                signal.signal(getattr(signal, sig), handler)
        weights = self.run.export(self.model)
        if self.ema is not None:
            self.run.export(self.ema.module, EMA_WEIGHTS)
        self._log_end(history, time.perf_counter() - fit_start_s, weights)
        return record

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested = True

    def _log_start(self) -> None:
        if self.accelerator.is_main_process:
            log.info("\n" + start_summary(self.cfg, self.backend, self.data, self.accelerator.scaler is not None, self.steps_per_epoch, self.state))

    def _log_end(self, history: list[dict[str, Any]], total_s: float, weights: Path) -> None:
        if self.accelerator.is_main_process and history:
            log.info("done\n" + end_summary(history, total_s, weights, self.checkpoints.directory))

    def close(self) -> None:
        self.accelerator.end_training()

