"""Checkpoints: atomic save through Accelerate, keep-last-K plus best, resume, export.

A checkpoint is `checkpoints/step_<N>/`, Accelerate's `save_state` files plus
`trainer_state.json`, which is written last. Everything is first written to
`checkpoints/.tmp-step_<N>/` and renamed into place only when complete, so a kill at any
moment leaves either the whole checkpoint or none of it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.checkpoint_files import check_checkpoint_files
from trainer.errors import CheckpointError
from trainer.loop.stop import hold_for_test

STATE_FILE = "trainer_state.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"

log = logging.getLogger(__name__)


def checkpoint_name(global_step: int) -> str:
    """The directory name of the checkpoint taken after `global_step` optimizer steps."""
    return f"{PREFIX}{global_step:08d}"


@dataclass
class TrainState:
    """Where training stands; everything resume needs besides Accelerate's state."""

    epoch: int = 0  # epoch in progress
    batches_done: int = 0  # micro-batches of this epoch this process trained on (this run's process count)
    samples_done: int = 0  # samples of the epoch's global order trained on, all processes (a resume goes on there)
    global_step: int = 0  # optimizer steps so far
    processes: int = 0  # the process count that wrote the checkpoint (0: a checkpoint from before it was recorded)
    global_batch: int = 0  # images per optimizer step of that run
    epoch_samples: int = 0  # the epoch's length in samples in that run
    best_val_top1: float = -1.0
    best_checkpoint: str = ""
    scheduler: dict = field(default_factory=dict)
    epoch_totals: dict = field(default_factory=dict)  # the epoch's train sums to samples_done, all processes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Saves, lists, prunes and loads the checkpoints of one run."""

    def __init__(self, accelerator: Any, directory: Path, keep_last: int) -> None:
        self.accelerator, self.directory, self.keep_last = accelerator, directory, keep_last

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [
            p
            for p in self.directory.iterdir()
            if p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and (p / STATE_FILE).is_file()
        ]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))

    def save(
        self,
        state: TrainState,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        extra_weights: dict[str, torch.nn.Module] | None = None,
    ) -> Path:
        """Write a checkpoint of the current step atomically; every process must call it.

        `extra_weights` maps file names to models saved beside Accelerate's state as plain
        safetensors (the EMA's `model_ema.safetensors`), inside the same atomic rename.
        """
        acc = self.accelerator
        name = checkpoint_name(state.global_step)
        final, tmp = self.directory / name, self.directory / f"{TMP_PREFIX}{name}"
        state.scheduler = scheduler.state_dict()
        try:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp), safe_serialization=True)
            hold_for_test("save")  # half written: a stop requested now is honoured once this save is complete
            acc.wait_for_everyone()
            if acc.is_main_process:
                for file_name, module in (extra_weights or {}).items():
                    export_weights(module, tmp / file_name)
                with open(tmp / STATE_FILE, "w") as f:
                    json.dump(asdict(state), f)
                    f.flush()
                    os.fsync(f.fileno())
                if final.exists():  # the same step saved again (end of epoch after a step save)
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(self.directory)
                self.prune(keep=state.best_checkpoint)
        # NOTE: safetensors reports a failed write (a full disk) as its own SafetensorError
        except (OSError, SafetensorError) as err:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"{tmp}: checkpoint write failed ({write_failure(err)}); earlier checkpoints are intact"
            ) from None
        acc.wait_for_everyone()
        return final

    def prune(self, keep: str = "") -> None:
        """Drop all but the newest `keep_last` checkpoints and the one named `keep` (the best)."""
        complete = self.checkpoints()
        for path in complete[: -self.keep_last]:
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.directory.glob(f"{TMP_PREFIX}*"):  # left by a killed save
            shutil.rmtree(path, ignore_errors=True)

    def resolve(self, resume: str) -> list[Path]:
        """Candidates for `train.resume`, best first: `auto` tries newest to oldest."""
        if not resume:
            return []
        if resume == "auto":
            return list(reversed(self.checkpoints()))
        path = Path(resume).expanduser()
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(f"train.resume: {path} is not a complete checkpoint (no {STATE_FILE})")
        return [path]

    def load(self, path: Path, scheduler: Any = None, extra_weights: dict | None = None) -> TrainState:
        """Restore model, optimizer, scaler, RNG states, `scheduler` and the `extra_weights` saved; the trainer state.

        Raises:
            CheckpointError: naming the file and the reason, for a file that is not whole,
                would run code when unpickled (`trainer.checkpoint_files`), or does not fit
                this run (another model, another optimizer).
        """
        check_checkpoint_files(path)  # before anything is unpickled
        try:
            state = TrainState(**json.loads((path / STATE_FILE).read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise CheckpointError(f"{path / STATE_FILE}: unreadable checkpoint ({first_lines(err)})") from None
        try:
            self.accelerator.load_state(str(path))
        # NOTE: anything Accelerate or torch raises for these checked files (a missing file,
        # shapes of another model, an optimizer of other parameter groups) ends this
        # candidate, not the run: resume tries the next one.
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{path}: unreadable checkpoint ({first_lines(err)})") from None
        if scheduler is not None:
            try:
                scheduler.load_state_dict(state.scheduler)
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                problem = f"its scheduler state does not fit this run ({first_lines(err)})"
                raise CheckpointError(f"{path / STATE_FILE}: {problem}") from None
        for file_name, module in (extra_weights or {}).items():
            if (path / file_name).is_file():
                try:
                    module.load_state_dict(load_file(str(path / file_name)))
                except (RuntimeError, OSError, SafetensorError) as err:
                    raise CheckpointError(f"{path / file_name}: does not fit this run ({first_lines(err)})") from None
        return state

    def loaded_everywhere(self, loaded: bool) -> bool:
        """Whether every process loaded a checkpoint; all must call it (one's random states may fail there alone)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return loaded
        return acc.reduce(torch.tensor([int(not loaded)], device=acc.device), "sum").item() == 0


def first_lines(err: BaseException) -> str:
    """An error in a few words: its type and first two lines (torch's second names the tensor that does not fit)."""
    lines = [line.strip() for line in str(err).strip().splitlines()[:2] if line.strip()]
    return f"{type(err).__name__}: {' '.join(lines)}" if lines else type(err).__name__


def write_failure(err: Exception) -> str:
    """Why a write failed, in a few words ("No space left on device"), from an OSError or a SafetensorError."""
    text = getattr(err, "strerror", None) or str(err)
    return text.removeprefix("Error while serializing: ").removeprefix("I/O error: ")


def export_weights(model: torch.nn.Module, path: Path) -> Path:
    """Save plain weights as safetensors that timm loads via pretrained_cfg_overlay=dict(file=...)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    except BaseException:
        tmp.unlink(missing_ok=True)  # a part-written file (a full disk) would only take more space
        raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # NOTE: safetensors creates 0600; every other file of a run is 0644
    os.replace(tmp, path)
    return path
