"""What people watch: bar on a terminal, log lines elsewhere; trackers fail early and clearly."""

from __future__ import annotations

import io
import logging

import pytest

from trainer.config import ConfigError
from trainer.progress import EpochProgress, check_trackers, use_bar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


STATS = {"loss": 1.25, "top1": 0.5, "lr": 0.1, "img_per_s": 123.0}


def test_bar_on_a_terminal_log_lines_elsewhere():
    assert use_bar("auto", FakeTerminal()) and not use_bar("auto", io.StringIO())
    assert use_bar("bar", io.StringIO()) and not use_bar("log", FakeTerminal())


def test_terminal_gets_a_tqdm_bar_with_the_stats(caplog):
    stream = FakeTerminal()
    progress = EpochProgress(0, 3, total_steps=10, start_step=0, enabled=True, mode="auto", stream=stream)
    with caplog.at_level(logging.INFO, logger="trainer"):
        progress.update(5, STATS)
        progress.close()
    text = stream.getvalue()
    assert "epoch 1/3" in text and "5/10" in text and "loss=1.2500" in text and "img_s=123" in text
    assert not caplog.records  # no duplicate log lines next to the bar


def test_pipe_gets_plain_log_lines_with_eta(caplog):
    stream = io.StringIO()
    progress = EpochProgress(1, 3, total_steps=10, start_step=4, enabled=True, mode="auto", stream=stream)
    with caplog.at_level(logging.INFO, logger="trainer"):
        progress.update(1, None)  # no stats read this step: nothing printed
        progress.update(1, STATS)
    assert stream.getvalue() == ""
    (record,) = caplog.records
    line = record.getMessage()
    assert line.startswith("epoch 2/3 step 6/10 loss 1.2500 top1 0.500 lr 0.1 123 img/s eta ")


def test_other_ranks_show_nothing(caplog):
    stream = FakeTerminal()
    with caplog.at_level(logging.INFO, logger="trainer"):
        progress = EpochProgress(0, 1, 10, 0, enabled=False, mode="auto", stream=stream)
        progress.update(1, STATS)
        progress.close()
    assert stream.getvalue() == "" and not caplog.records


def test_missing_tracker_is_one_clear_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(
        ConfigError, match=r"cfg.yaml: output.log_with: 'wandb' needs the wandb package: pip " r"install wandb"
    ):
        check_trackers(["wandb"], "cfg.yaml")
    with pytest.raises(ConfigError, match="unknown tracker 'neptune'"):
        check_trackers(["neptune"], "cfg.yaml")
