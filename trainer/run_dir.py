"""RunDirectory: what a run writes besides checkpoints: config.yaml, metrics, skipped.txt, plots, the model folders."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from trainer.checkpoint import PREFIX, STATE_FILE, CheckpointError, write_failure
from trainer.config import Config, ConfigError, save_config
from trainer.metrics import MetricsWriter
from trainer.model_folder import EMA_FOLDER, MODEL_FOLDER
from trainer.plots import write_plots

log = logging.getLogger("trainer")


class RunDirectory:
    """`output.dir/<run name>/`; every process may record skips, the main process writes the rest."""

    def __init__(self, cfg: Config, accelerator: Any) -> None:
        self.cfg, self.path, self.accelerator = cfg, cfg.run_dir, accelerator
        self.metrics = MetricsWriter(self.path)

    def prepare(self) -> None:
        """Create the directory and save the resolved config; a one-line error if it cannot.

        A directory that already holds a run is continued only with `train.resume`, and
        replaced only with `output.overwrite=true`: a new run never mixes its records with
        an earlier one's.

        NOTE: the main process decides and tells the others, so that every process stops
        with the same line instead of the others waiting for it at the next collective.
        """
        problem = None
        if self.accelerator.is_main_process:
            try:
                problem = self._claim()
            except OSError as err:
                problem = f"{self.cfg.source}: output.dir: cannot write {self.path} ({err.strerror or err})"
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            problem = broadcast_object_list([problem], from_process=0)[0]
        if problem:
            raise ConfigError(problem)

    def _claim(self) -> str | None:
        """Make the directory this run's (main process); the reason it cannot, or None."""
        existing = describe_run(self.path)
        if existing and not self.cfg.train.resume:
            if not self.cfg.output.overwrite:
                return (
                    f"{self.cfg.source}: {self.path} already holds a run "
                    f"({existing}); continue it with train.resume=auto, "
                    f"or start another with output.run_name=<new name> (output.overwrite=true replaces it)"
                )
            log.warning("output.overwrite=true: replacing the run in %s (%s)", self.path, existing)
            for name in RUN_FILES:
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.path / "config.yaml")
        return None

    def record_skipped(self, lines: list[str]) -> int:
        """Append `path<TAB>reason` lines to skipped.txt; returns how many."""
        self.path.mkdir(parents=True, exist_ok=True)  # `trainer eval` may run before any training did
        with open(self.path / "skipped.txt", "a") as f:
            f.write("".join(line + "\n" for line in lines))
        return len(lines)

    def write_step(self, record: dict[str, Any]) -> None:
        """A logged step's loss, top-1, lr and img/s to steps.jsonl (the lr curve is drawn from these)."""
        if self.accelerator.is_main_process:
            self.metrics.write_step(record)

    def write_epoch(self, record: dict[str, Any]) -> None:
        """The epoch's record to the metrics files, the trackers, the log and the plots."""
        if not self.accelerator.is_main_process:
            return
        self.metrics.write(record)
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
        log.info(
            "epoch %d: %s",
            record["epoch"] + 1,
            " ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)),
        )
        if self.cfg.output.plots:
            write_plots(self.path)

    def export(self, model: Any, *, classes: list[str], input_config: dict, ema: bool = False) -> Path:
        """The final weights as a model folder, RUN/model/ (RUN/model_ema/ with `ema`); returns it.

        The folder holds config.json, model.safetensors and the model card
        (`trainer.model_folder`); RUN/model.safetensors (model_ema.safetensors) is the same file.
        """
        from trainer.run_model import export_run_folder

        folder = self.path / (EMA_FOLDER if ema else MODEL_FOLDER)
        if self.accelerator.is_main_process:
            unwrapped, n = self.accelerator.unwrap_model(model), self.accelerator.num_processes
            inputs = dict(classes=classes, input_config=input_config)
            try:
                export_run_folder(self.path, self.cfg, unwrapped, **inputs, ema=ema, processes=n)
            except (OSError, SafetensorError) as err:
                again = "the checkpoints are intact, and train.resume=auto writes them again"
                failure = write_failure(err)
                raise CheckpointError(f"{folder}: writing the final weights failed ({failure}); {again}") from None
        self.accelerator.wait_for_everyone()
        return folder


# What a run leaves in its directory besides config.yaml; output.overwrite=true removes them.
RUN_FILES = (
    "metrics.jsonl",
    "metrics.csv",
    "steps.jsonl",
    "checkpoints",
    "model.safetensors",
    "model_ema.safetensors",
    MODEL_FOLDER,
    EMA_FOLDER,
    "plots",
    "skipped.txt",
)


def describe_run(path: Path) -> str:
    """What the run in `path` got to ("finished, last step 360"), or "" when none is there."""
    checkpoints = path / "checkpoints"
    steps = (
        sorted(
            int(p.name[len(PREFIX) :])
            for p in checkpoints.glob(f"{PREFIX}*")
            if p.name[len(PREFIX) :].isdigit() and (p / STATE_FILE).is_file()
        )
        if checkpoints.is_dir()
        else []
    )
    records = []
    if (path / "metrics.jsonl").is_file():
        for line in (path / "metrics.jsonl").read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
    if not steps and not records and not (path / "model.safetensors").exists():
        return ""
    finished = "finished" if (path / "model.safetensors").exists() else "not finished"
    last_step = max([*steps, *(r.get("step", 0) for r in records)], default=0)
    epochs = f", {len(records)} epoch(s) recorded" if records else ""
    return f"{finished}, last step {last_step}{epochs}"
