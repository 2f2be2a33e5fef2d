"""What people watch: a tqdm bar on a terminal, plain log lines elsewhere, rank 0 only."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

log = logging.getLogger("trainer")


def setup_logging(is_main_process: bool, debug: bool = False) -> None:
    """Rank 0 logs at INFO; other ranks only warnings, unless --debug."""
    level = logging.DEBUG if debug else (logging.INFO if is_main_process else logging.WARNING)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr, force=True
    )
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock", "fsspec", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)


def use_bar(mode: str, stream: TextIO) -> bool:
    """auto: a bar when the stream is a terminal, log lines otherwise (CI, cluster logs)."""
    if mode == "auto":
        return stream.isatty()
    return mode == "bar"


class EpochProgress:
    """Per-epoch display of loss, top-1, lr, img/s and ETA."""

    def __init__(
        self,
        epoch: int,
        epochs: int,
        total_steps: int,
        start_step: int,
        enabled: bool,
        mode: str,
        stream: TextIO | None = None,
    ) -> None:
        # NOTE: read at each call, not bound at import (a replaced sys.stderr is honoured)
        stream = stream or sys.stderr
        self.epoch, self.epochs, self.total, self.enabled = epoch, epochs, total_steps, enabled
        self.step, self.first_step, self.start_s = start_step, start_step, time.perf_counter()
        self.bar = None
        if enabled and use_bar(mode, stream):
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=f"epoch {epoch + 1}/{epochs}",
                file=stream,
                dynamic_ncols=True,
                leave=True,
            )

    def update(self, steps: int, stats: dict[str, Any] | None) -> None:
        """Advance by `steps`; `stats` (loss, top1, lr, img_per_s) when read this step."""
        self.step += steps
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(steps)
            if stats:
                self.bar.set_postfix(
                    loss=f"{stats['loss']:.4f}",
                    top1=f"{stats['top1']:.3f}",
                    lr=f"{stats['lr']:.3g}",
                    img_s=f"{stats['img_per_s']:.0f}",
                    refresh=False,
                )
        elif stats:
            eta_s = (
                (self.total - self.step) * (time.perf_counter() - self.start_s) / max(self.step - self.first_step, 1)
            )
            log.info(
                "epoch %d/%d step %d/%d loss %.4f top1 %.3f lr %.4g %.0f img/s eta %s",
                self.epoch + 1,
                self.epochs,
                self.step,
                self.total,
                stats["loss"],
                stats["top1"],
                stats["lr"],
                stats["img_per_s"],
                _hms(eta_s),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(names: list[str], source: str) -> None:
    """Fail early, in one line, for a tracker that is unknown or not installed."""
    import importlib.util

    from trainer.config import ConfigError

    for name in names:
        package = TRACKER_PACKAGES.get(name)
        if package is None:
            raise ConfigError(
                f"{source}: output.log_with: unknown tracker '{name}' (choose from {', '.join(TRACKER_PACKAGES)})"
            )
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"{source}: output.log_with: '{name}' needs the {package} package: pip install {package}")
