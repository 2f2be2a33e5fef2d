"""The global batch: per-device batch x processes x accumulation, and what a resume on another count keeps.

With `loader.global_batch_size` set, the accumulation is derived from the processes a run
has (1024 = 128 x 8 cards, or 128 x 4 cards x 2 accumulation), so a job that moves
between cluster sizes keeps its optimizer steps, its steps per epoch and its lr schedule.
Set to 0, the global batch is whatever the launch gives (per device x processes x
`train.grad_accum_steps`), as before.

A checkpoint records the process count and global batch that wrote it (`TrainState`), and
`ResumeChange` words what differs in the run resuming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.checkpoint import TrainState
from trainer.errors import ConfigError


def processes_text(count: int) -> str:
    """ "1 process", "2 processes"."""
    return f"{count} process" + ("" if count == 1 else "es")


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's images are split: `per_device` x `processes` x `accumulation`."""

    per_device: int
    processes: int
    accumulation: int
    fixed: bool = False  # set by loader.global_batch_size (else the launch decides)

    @property
    def global_batch(self) -> int:
        """Images per optimizer step, over all processes and micro-batches."""
        return self.per_device * self.processes * self.accumulation

    @property
    def round_size(self) -> int:
        """Images one micro-batch on every process takes from the epoch's global order."""
        return self.per_device * self.processes

    def describe(self) -> str:
        """ "8/device x 2 processes x 2 accumulation = global 32 (loader.global_batch_size)"."""
        split = f"{self.per_device}/device x {processes_text(self.processes)} x {self.accumulation} accumulation"
        text = f"{split} = global {self.global_batch}"
        return text + (" (loader.global_batch_size)" if self.fixed else "")


def plan_batch(
    *,
    global_batch_size: int,
    per_device: int,
    processes: int,
    grad_accum_steps: int,
    source: str = "",
) -> BatchPlan:
    """The batch plan of a run with `processes` processes.

    Raises:
        ConfigError: the global batch is not a whole number of micro-batches on every
            process, or `train.grad_accum_steps` is set beside it.
    """
    if not global_batch_size:
        return BatchPlan(per_device, processes, grad_accum_steps)
    where = f"{source}: " if source else ""
    if grad_accum_steps != 1:
        raise ConfigError(
            f"{where}loader.global_batch_size={global_batch_size} derives the accumulation from the process count; "
            f"leave train.grad_accum_steps at 1 (got {grad_accum_steps})"
        )
    unit = per_device * processes
    if global_batch_size % unit:
        counts = [n for n in range(1, global_batch_size // per_device + 1) if global_batch_size % (per_device * n) == 0]
        raise ConfigError(
            f"{where}loader.global_batch_size={global_batch_size} is not a "
            f"multiple of loader.batch_size_per_device={per_device} x "
            f"{processes} processes = {unit}; "
            "launch "
            f"{', '.join(map(str, counts[:12]))}{' ...' if len(counts) > 12 else ''} "
            "processes, or change either key"
        )
    return BatchPlan(per_device, processes, global_batch_size // unit, fixed=True)


@dataclass(frozen=True)
class ResumeChange:
    """The checkpoint's process count and global batch beside this run's (0 where an old checkpoint did not say)."""

    processes_then: int
    global_batch_then: int
    plan: BatchPlan

    @property
    def processes_changed(self) -> bool:
        return bool(self.processes_then) and self.processes_then != self.plan.processes

    @property
    def batch_changed(self) -> bool:
        return bool(self.global_batch_then) and self.global_batch_then != self.plan.global_batch

    def __bool__(self) -> bool:
        return self.processes_changed or self.batch_changed

    def summary(self) -> str:
        """ "checkpoint: 2 processes, global batch 16; this run: 1 process, global batch 16" (for the start summary)."""
        return (
            f"checkpoint: {processes_text(self.processes_then)}, global batch {self.global_batch_then}; "
            f"this run: {processes_text(self.plan.processes)}, global batch {self.plan.global_batch}"
        )


@dataclass(frozen=True)
class Continuation:
    """How a resumed run goes on: what changed, where the schedule stands (None: as saved), what to log."""

    change: ResumeChange
    schedule_step: int | None
    lines: list[str]


def continue_epoch(
    state: TrainState,
    plan: BatchPlan,
    *,
    epoch_samples: int,
    steps_per_epoch: int,
    epochs: int,
    streamed: bool,
) -> Continuation:
    """Fit a loaded `state` to this run's batch plan (in place), and say what changed.

    The epoch goes on at `state.samples_done` of its global order whatever the process
    count. With the same global batch the steps and the schedule are the checkpoint's;
    with another, the schedule is moved to the same point of the run, in epochs, on this
    run's steps per epoch, so it still ends at the configured epoch.
    """
    if state.batches_done and not state.samples_done:  # a checkpoint older than samples_done: the same count assumed
        state.samples_done = state.batches_done * plan.round_size
    change = ResumeChange(state.processes, state.global_batch, plan)
    done, lines, schedule_step = state.samples_done, [], None
    at = f"at sample {done} of {epoch_samples}" if epoch_samples else f"after {done} samples"
    where = f"epoch {state.epoch + 1} goes on {at}"
    if change.batch_changed:
        then = state.epoch_samples or epoch_samples
        position = state.epoch + (done / then if then else 0.0)
        schedule_step = round(position * steps_per_epoch)
        steps_then = math.ceil(then / state.global_batch) if then else 0
        lines.append(
            f"resumed with global batch {plan.global_batch} "
            f"({plan.describe()}) where the checkpoint had "
            f"{state.global_batch} "
            f"on {processes_text(state.processes)}: {steps_per_epoch} steps "
            f"per epoch instead of {steps_then}, lr as given (optim.lr, not "
            "rescaled); "
            f"the schedule goes on from epoch {position:.2f} (its step "
            f"{schedule_step} of {steps_per_epoch * epochs}) and still ends "
            f"at epoch {epochs}; {where}"
        )
    elif change.processes_changed:
        lines.append(
            f"resumed on {processes_text(plan.processes)} where the checkpoint had {state.processes}: "
            f"the global batch stays {plan.global_batch} ({plan.describe()}), "
            f"{steps_per_epoch} steps per epoch and the lr schedule "
            f"unchanged; {where}"
        )
    if streamed and change.processes_changed and done:
        lines.append(
            "data.streaming: the stream's shards are dealt anew over "
            f"{processes_text(plan.processes)}, so the rest of epoch "
            f"{state.epoch + 1} skips "
            f"about {done} samples in all, not the same ones: some images of "
            "this epoch may be seen twice or not at all (exact again from "
            "the next epoch)"
        )
    state.batches_done = done // plan.round_size  # this run's micro-batches per process
    return Continuation(change, schedule_step, lines)
