"""RunDirectory: what a run writes besides checkpoints: config.yaml, metrics, skipped.txt, plots, weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trainer.checkpoint import export_weights
from trainer.config import Config, ConfigError, save_config
from trainer.metrics import MetricsWriter
from trainer.plots import write_plots

log = logging.getLogger("trainer")


class RunDirectory:
    """`output.dir/<run name>/`; every process may record skips, the main process writes the rest."""

    def __init__(self, cfg: Config, accelerator: Any) -> None:
        self.cfg, self.path, self.accelerator = cfg, cfg.run_dir, accelerator
        self.metrics = MetricsWriter(self.path)

    def prepare(self) -> None:
        """Create the directory and save the resolved config; a one-line error if it cannot."""
        if self.accelerator.is_main_process:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                save_config(self.cfg, self.path / "config.yaml")
            except OSError as err:
                raise ConfigError(f"{self.cfg.source}: output.dir: cannot write {self.path} ({err.strerror or err})") from None
        self.accelerator.wait_for_everyone()

    def record_skipped(self, lines: list[str]) -> int:
        """Append `path<TAB>reason` lines to skipped.txt; returns how many."""
        self.path.mkdir(parents=True, exist_ok=True)  # `trainer eval` may run before any training did
        with open(self.path / "skipped.txt", "a") as f:
            f.write("".join(line + "\n" for line in lines))
        return len(lines)

    def write_epoch(self, record: dict[str, Any]) -> None:
        """The epoch's record to the metrics files, the trackers, the log and the plots."""
        if not self.accelerator.is_main_process:
            return
        self.metrics.write(record)
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
        log.info("epoch %d: %s", record["epoch"] + 1, " ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)))
        if self.cfg.output.plots:
            write_plots(self.path)

    def export(self, model: Any, name: str = "model.safetensors") -> Path:
        """The final weights as model.safetensors (or `name`: the EMA's), loadable by timm."""
        path = self.path / name
        if self.accelerator.is_main_process:
            export_weights(self.accelerator.unwrap_model(model), path)
        self.accelerator.wait_for_everyone()
        return path
