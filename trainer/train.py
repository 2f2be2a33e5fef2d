"""Trainer: train_step, train_epoch, evaluate, fit, close, over Accelerate; its parts come from `trainer.build`.

The side mechanisms are components in `trainer/loop/`: the optimizer-step boundary and
its hooks (`OptimizerStep`), the lockstep of uneven stream shards (`Lockstep`, `StandIn`),
the non-finite guard and the stop agreement between processes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from trainer.build import build_training, epoch_samples
from trainer.checkpoint import CheckpointError, CheckpointManager, TrainState, checkpoint_name
from trainer.config import Config, config_to_dict
from trainer.ema import EMA_WEIGHTS, EmaStepHook, create_ema
from trainer.errors import TrainingStopped
from trainer.evaluate import evaluate
from trainer.global_batch import Continuation, ResumeChange, continue_epoch
from trainer.loop.clip import GradClip
from trainer.loop.lockstep import Lockstep, StandIn, is_empty
from trainer.loop.nonfinite import NonFiniteGuard
from trainer.loop.step import OptimizerStep
from trainer.loop.stop import StopAgreement, hold_for_test
from trainer.loop.tally import EpochTally
from trainer.loss import hard_labels
from trainer.metrics import RunningSums, topk_correct
from trainer.optim import move_schedule
from trainer.progress import EpochProgress
from trainer.run_dir import RunDirectory
from trainer.summary import end_summary, flat_config, start_summary

log = logging.getLogger("trainer")

__all__ = ["Trainer", "TrainingStopped"]


class Trainer:
    """One training run: `Trainer(cfg).fit()` trains, validates, checkpoints and exports."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.run_dir, t = cfg, cfg.run_dir, cfg.train
        parts = build_training(cfg)
        self.accelerator, self.backend, self.plan, self.data = parts.accelerator, parts.backend, parts.plan, parts.data
        self.pipeline, self.model, self.optimizer, self.scheduler = (
            parts.pipeline,
            parts.model,
            parts.optimizer,
            parts.scheduler,
        )
        self.train_loader, self.val_loader, self.normalize = (
            self.pipeline.train,
            self.pipeline.val,
            self.pipeline.normalize,
        )
        self.steps_per_epoch, self.batch_augment, self.criterion = (
            parts.steps_per_epoch,
            parts.batch_augment,
            parts.criterion,
        )
        acc = self.accelerator
        self.checkpoints = CheckpointManager(acc, self.run_dir / "checkpoints", t.keep_last_checkpoints)
        self.run = RunDirectory(cfg, acc)
        self.state = TrainState()
        self.change = ResumeChange(0, 0, self.plan)  # the checkpoint's process count and global batch beside this run's
        self.boundary = OptimizerStep(acc, self.model, self.optimizer, self.scheduler, self.state)
        self.clip = GradClip(acc, self.model, t.grad_clip_norm) if t.grad_clip_norm else None
        self.ema = create_ema(cfg.ema, acc.unwrap_model(self.model))
        for hook in (self.clip, self.ema and EmaStepHook(self.ema, acc.unwrap_model(self.model))):
            if hook:
                self.boundary.add_hook(hook)
        self.tally = EpochTally(acc, self.clip)
        self.guard = NonFiniteGuard(
            acc.device, t.max_non_finite_steps, acc.scaler is not None, self.checkpoints.directory
        )
        self.stop = StopAgreement(acc, every_step=self.backend.host_sync_is_free)
        self.saved_step = 0  # the step of the newest checkpoint of this run (0: none needed yet)
        self.stand_in = StandIn(self.data.data_config["input_size"], acc.device)

    # -- setup helpers ---------------------------------------------------------------
    def _epoch_samples(self) -> int:
        return epoch_samples(self.data, self.plan)

    def _continue(self, state: TrainState) -> Continuation:
        """Take `state` over for this run's batch plan; log what changed and move the schedule where needed."""
        t = self.cfg.train
        go_on = continue_epoch(
            state,
            self.plan,
            epoch_samples=self._epoch_samples(),
            steps_per_epoch=self.steps_per_epoch,
            epochs=t.epochs,
            streamed=self.data.streamed,
        )
        # NOTE: Accelerate's load_state restores its micro-batch counter (`Accelerator.step`,
        # accelerate/src/accelerate/accelerator.py), which decides the accumulation window by
        # `step % accumulation`: counted on another process count it would close the first
        # window early. A checkpoint is taken at an update, so a window starts here.
        self.accelerator.step = 0
        if go_on.schedule_step is not None:
            move_schedule(self.scheduler, go_on.schedule_step)
        for line in go_on.lines:
            log.warning(line)
        return go_on

    def resume(self) -> None:
        """Continue from `train.resume`: the newest complete checkpoint that loads."""
        candidates = self.checkpoints.resolve(self.cfg.train.resume)
        extra_weights = {EMA_WEIGHTS: self.ema.module} if self.ema else None
        for path in candidates:
            try:
                state, problem = self.checkpoints.load(path, self.scheduler, extra_weights), ""
            except CheckpointError as err:
                problem = str(err)
            if not self.checkpoints.loaded_everywhere(not problem):
                problem = problem or f"{path}: another process could not load it (see its log)"
                log.warning("skipping checkpoint: %s", problem)
                continue
            vars(self.state).update(vars(state))  # in place: the step boundary holds this object
            self.saved_step = self.state.global_step
            self.change = self._continue(self.state).change  # the scheduler's state is loaded: move it where needed
            if self.ema is not None and not (path / EMA_WEIGHTS).is_file():
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
                f"train.resume={self.cfg.train.resume}: none of the "
                f"{len(candidates)} checkpoints in {self.checkpoints.directory} "
                "could be loaded; move them away to start fresh"
            )
        if self.accelerator.is_main_process:
            self.run.metrics.drop_from_epoch(0)  # records of a run killed before its first checkpoint: it starts again

    # -- the loop --------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any], sums: RunningSums, batch_index: int = 0) -> bool:
        """One micro-batch: forward, backward and (at accumulation boundaries) the update; True when it updated.

        A batch whose every image was skipped still steps when there are several processes,
        on a stand-in with its loss weighted 0: the gradient all-reduce, the optimizer step
        and the schedule must stay in lockstep across processes, and this process then adds
        nothing to the gradient, the loss or the accuracy. `batch_index` is the micro-batch's
        place in the epoch's global order, in batches (it seeds the batch augmentation).
        """
        stand_in = is_empty(batch)
        if stand_in:
            batch = self.stand_in.batch()
        else:
            self.stand_in.remember(batch)
        images, labels = self.normalize(batch["images"]), batch["labels"]
        targets = labels
        if self.batch_augment is not None:  # seeded by the micro-batch's place in the epoch: exact on resume
            images, targets = self.batch_augment(images, labels, self.state.epoch, batch_index)
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
        batches, plan = self._epoch_batches(epoch), self.plan
        step_in_epoch = state.samples_done // plan.global_batch
        progress = EpochProgress(epoch, t.epochs, self.steps_per_epoch, step_in_epoch, *self._shown())
        tally.start(state.epoch_totals if state.samples_done else {})
        start_s = window_s = time.perf_counter()
        for batch in batches:
            tally.skipped += self.run.record_skipped(batch["skipped"]) if batch["skipped"] else 0
            # this process's batch of the round: Accelerate deals batch j of the order to process j % processes
            batch_index = state.samples_done // plan.per_device + self.accelerator.process_index
            state.batches_done, state.samples_done = state.batches_done + 1, state.samples_done + plan.round_size
            # all skipped; several processes step on together
            if is_empty(batch) and self.accelerator.num_processes == 1:
                continue
            if not self.train_step(batch, tally.window, batch_index):
                continue  # inside an accumulation window
            step_in_epoch += 1
            stats = None
            if step_in_epoch % t.log_every_steps == 0 or step_in_epoch == self.steps_per_epoch:
                stats, window_s = self._read_window(time.perf_counter() - window_s), time.perf_counter()
            progress.update(1, stats)
            hold_for_test("train_step")
            saved = self._checkpoint_due(step_in_epoch)
            if saved:
                state.epoch_totals = tally.snapshot()
                self._save_checkpoint()
            # NOTE: after a save too: every process has just waited for the others anyway
            agree = stats is not None or saved
            if self.stop.epoch_over(state.global_step, batches.ended, at_log_point=agree):
                break
            if step_in_epoch >= self.steps_per_epoch:
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
        sampler = self.data.train_sampler
        if sampler is not None:  # the rest of the epoch's global order, dealt over the processes now present
            sampler.set_epoch(epoch)
            sampler.set_start(self.state.samples_done)
        elif self.state.batches_done:  # NOTE: a stream has no global order: Accelerate skips per-process batches
            loader = self.accelerator.skip_first_batches(loader, self.state.batches_done)
        loader.set_epoch(epoch)
        pad = self.data.streamed and self.accelerator.num_processes > 1
        epoch_batches = self.steps_per_epoch * self.plan.accumulation
        return Lockstep(loader, pad, epoch, self.state.batches_done, epoch_batches, self.accelerator.process_index)

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
            state = self.state  # with the batch plan that wrote it, for a resume on another process count
            state.processes, state.global_batch = self.plan.processes, self.plan.global_batch
            state.epoch_samples = self._epoch_samples()
            self.checkpoints.save(
                state, self.scheduler, extra_weights={EMA_WEIGHTS: self.ema.module} if self.ema else None
            )
            self.saved_step = self.state.global_step

    def evaluate(self, num_classes_for_confusion: int = 0) -> dict[str, Any]:
        """Val loss, top-1 and top-5 over every val image once (`trainer.evaluate`); `stopped` > 0 if cut short."""
        acc, skipped, stop = self.accelerator, self.run.record_skipped, self.stop.asked_here
        k = num_classes_for_confusion
        model, loader, normalize = self.model, self.val_loader, self.normalize
        return evaluate(acc, model, loader, normalize, skipped, num_classes_for_confusion=k, stop_requested=stop)

    def evaluate_ema(self) -> dict[str, Any]:
        """The same figures for the EMA weights, keyed `val_top1_ema` etc. (and `stopped`); {} without an EMA."""
        if self.ema is None:
            return {}
        acc, stop = self.accelerator, self.stop.asked_here
        # skips: recorded by the raw pass
        result = evaluate(acc, self.ema.module, self.val_loader, self.normalize, len, stop_requested=stop)
        self.ema.module.eval()  # NOTE: evaluate leaves a model in train mode; the EMA never trains
        kept = (k for k in result if k not in ("val_samples", "val_skipped"))
        return {k if k == "stopped" else f"{k}_ema": result[k] for k in kept}

    def _validate(self) -> dict[str, Any] | None:
        """The val figures, the EMA's too; None when any process was asked to stop during validation."""
        scores = self.evaluate()
        if self.stop.adopt(scores.pop("stopped") > 0):
            return None
        ema_scores = self.evaluate_ema()
        if self.stop.adopt(ema_scores.pop("stopped", 0) > 0):
            return None
        return {**scores, **ema_scores}

    def fit(self) -> dict[str, Any]:
        """Train all epochs; returns the last epoch's metrics.

        SIGINT/SIGTERM (Ctrl-C, torchrun, Slurm) request a stop, honoured by every process
        at the same point: mid-epoch at the next step (or log point), after a checkpoint
        save, in validation, or between epochs (`trainer.loop.stop`); the newest state is
        then checkpointed once and the run returns.
        """
        with self.stop.signals():
            self.run.prepare()
            self.resume()
            self._start_trackers()
            self._log_start()
            fit_start_s, history, record = time.perf_counter(), [], {}
            for epoch in range(self.state.epoch, self.cfg.train.epochs):
                if self.stop.agreed():
                    return self._stop_now(record, "between epochs")
                self.state.epoch = epoch
                record = {"epoch": epoch, **self.train_epoch(epoch)}
                if self.stop.agreed():
                    return self._stop_now(record, f"in epoch {epoch + 1}")
                if epoch + 1 == self.cfg.train.epochs or (epoch + 1) % self.cfg.train.eval_every_epochs == 0:
                    scores = self._validate()
                    if scores is None:
                        # NOTE: the epoch's training is kept: checkpointed as an epoch whose batches are all
                        # done, so the resumed run trains nothing more of it and validates it first.
                        moment = f"in epoch {epoch + 1}'s validation: its training is kept, and resuming validates it"
                        return self._stop_now(record, moment)
                    record.update(scores)
                record.update(step=self.state.global_step, lr=self.boundary.lr)
                self._end_epoch(record)
                history.append(record)
                hold_for_test("epoch_end")
            weights = self.run.export(self.model, classes=self.data.classes, input_config=self.data.data_config)
            if self.ema is not None:
                classes, input_config = self.data.classes, self.data.data_config
                self.run.export(self.ema.module, classes=classes, input_config=input_config, ema=True)
        self._log_end(history, time.perf_counter() - fit_start_s, weights)
        return record

    def _end_epoch(self, record: dict[str, Any]) -> None:
        """Mark the epoch done, note the best checkpoint, write the record, then checkpoint."""
        self.state.epoch, self.state.epoch_totals = record["epoch"] + 1, {}
        self.state.batches_done = self.state.samples_done = 0
        if record.get("val_top1", -1) > self.state.best_val_top1:
            self.state.best_val_top1, self.state.best_checkpoint = (
                record["val_top1"],
                checkpoint_name(self.state.global_step),
            )
        # NOTE: record first, checkpoint second: a kill between them re-runs the epoch
        # and resume() drops the record; the other way round it was lost for good.
        self.run.write_epoch(record)
        self._save_checkpoint()

    def _stop_now(self, record: dict[str, Any], moment: str) -> dict[str, Any]:
        """Checkpoint what was trained since the newest checkpoint (if anything), say so, and return."""
        if self.saved_step != self.state.global_step:
            self._save_checkpoint()
        step = self.state.global_step
        resume = "resume with train.resume=auto"
        log.warning("stop requested: checkpoint saved at step %d (the stop came %s); %s", step, moment, resume)
        return record

    def _start_trackers(self) -> None:
        if self.cfg.output.log_with:
            self.accelerator.init_trackers(self.run_dir.name, config=flat_config(config_to_dict(self.cfg)))

    def _log_start(self) -> None:
        if self.accelerator.is_main_process:
            scaler = self.accelerator.scaler is not None
            summary = start_summary(
                self.cfg,
                self.backend,
                self.data,
                scaler,
                self.steps_per_epoch,
                self.state,
                plan=self.plan,
                change=self.change,
            )
            log.info("\n" + summary)

    def _log_end(self, history: list[dict[str, Any]], total_s: float, weights: Path) -> None:
        if self.accelerator.is_main_process and history:
            log.info("done\n" + end_summary(history, total_s, weights, self.checkpoints.directory))

    def close(self) -> None:
        self.accelerator.end_training()
