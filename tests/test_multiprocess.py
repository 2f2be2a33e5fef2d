"""Several processes, nothing hangs: Ctrl-C, a stuck process, a lost process, restarts.

Each test launches two CPU processes with `accelerate launch` on a tiny recipe and acts on
one of them by pid (found by a marker in its environment).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import helpers
from trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def tiny(tmp_path: Path, **train: object) -> Path:
    data = helpers.make_image_folder(tmp_path / "data", train_per_class=8)
    cfg = {
        "model": {"name": "test_resnet"},
        "data": {"root": str(data)},
        "loader": {"batch_size_per_device": 4, "workers": 0},
        "input": {"img_size": 32},
        "train": {"epochs": 4, "precision": "fp32", "channels_last": False, "log_every_steps": 1, **train},
        "output": {"dir": str(tmp_path / "runs"), "plots": False, "progress": "log"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Launch:
    """`accelerate launch` of two CPU processes, its stderr collected as it comes."""

    def __init__(self, config: Path, *overrides: str, launch_args: tuple[str, ...] = ()) -> None:
        self.marker = f"{os.getpid()}-{time.monotonic_ns()}"
        cmd = [*helpers.two_process_launcher(*launch_args), "trainer", "train", "--config", str(config), *overrides]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TRAINER_TEST_RUN": self.marker}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout_s: float = 300) -> None:
        end = time.monotonic() + timeout_s
        while needle not in self.text:
            assert self.proc.poll() is None or needle in self.text, f"exited {self.proc.returncode} before {needle!r}:\n{self.text[-3000:]}"
            assert time.monotonic() < end, f"no {needle!r} after {timeout_s} s:\n{self.text[-3000:]}"
            time.sleep(0.05)

    def worker(self, rank: int) -> int:
        """The pid of the training process with LOCAL_RANK=rank."""
        needles = {f"TRAINER_TEST_RUN={self.marker}".encode(), f"LOCAL_RANK={rank}".encode()}
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and needles <= set((proc / "environ").read_bytes().split(b"\0")):
                    return int(proc.name)
            except OSError:
                continue
        raise AssertionError(f"no process with LOCAL_RANK={rank}")

    def finish(self, timeout_s: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        finally:
            helpers.kill_marked(self.marker)  # torchrun starts its workers in sessions of their own
        self.reader.join(timeout=10)
        return rc


def test_ctrl_c_saves_a_checkpoint_and_every_process_exits_0_within_seconds(tmp_path):
    config = tiny(tmp_path, epochs=200)
    launch = Launch(config, "output.run_name=interrupted")
    launch.wait_for("epoch 2/200 step 1/")
    pids = [launch.worker(0), launch.worker(1)]
    start = time.monotonic()
    launch.proc.send_signal(signal.SIGINT)  # what Ctrl-C gives the launcher; torchrun forwards it
    launch.finish(timeout_s=60)
    elapsed = time.monotonic() - start
    text = launch.text
    (tmp_path / "launch.log").write_text(text)
    assert elapsed < 15, (elapsed, text[-3000:])
    assert "stop requested: checkpoint saved at step" in text, text[-3000:]
    assert "Unable to shutdown process" not in text  # torchrun never had to SIGKILL a worker
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    for rank in (0, 1):  # torchrun reports a worker's non-zero exit; none here
        assert f"local_rank: {rank} (pid: " not in text
    assert "trainer: error" not in text
    checkpoints = sorted((tmp_path / "runs" / "interrupted" / "checkpoints").iterdir())
    assert checkpoints and checkpoints[-1].name.startswith("step_")


def test_a_stuck_process_times_out_and_every_process_stops_with_one_line(tmp_path):
    config = tiny(tmp_path, epochs=200)
    launch = Launch(config, "output.run_name=stuck", "backend.collective_timeout_s=4")
    launch.wait_for("epoch 2/200 step 1/")
    stuck = launch.worker(1)
    os.kill(stuck, signal.SIGSTOP)  # stuck, as in a hung loader or a deadlock
    try:
        launch.wait_for("process 0: step", timeout_s=60)
    finally:
        os.kill(stuck, signal.SIGCONT)
    rc = launch.finish(timeout_s=90)
    text = launch.text
    assert rc != 0
    line = next(line for line in text.splitlines() if "process 0: step" in line)
    assert line.startswith("trainer: error: process 0: step ") and "timed out after backend.collective_timeout_s=4 s waiting in" in line, line
    assert "train.resume=auto" in line
    assert "Traceback" not in text.split("process 0: step")[0]  # no trainer traceback before the line


def test_a_lost_process_without_restarts_ends_the_survivor_with_one_line(tmp_path):
    config = tiny(tmp_path, epochs=200)
    launch = Launch(config, "output.run_name=lost")
    launch.wait_for("epoch 2/200 step 1/")
    survivor = launch.worker(0)
    start = time.monotonic()
    os.kill(launch.worker(1), signal.SIGKILL)
    rc = launch.finish(timeout_s=120)
    assert rc != 0
    assert time.monotonic() - start < 60
    assert not Path(f"/proc/{survivor}").exists()
    lines = [line for line in launch.text.splitlines() if line.startswith("trainer: error: process 0: step ")]
    assert len(lines) == 1 and "lost another process during" in lines[0], launch.text[-3000:]


def test_a_killed_process_is_survived_with_max_restarts_and_ends_bit_for_bit(tmp_path):
    config = tiny(tmp_path, epochs=4, resume="auto", checkpoint_every_steps=1)
    straight = Launch(config, "output.run_name=straight")
    assert straight.finish() == 0, straight.text[-3000:]

    launch = Launch(config, "output.run_name=restarted", launch_args=("--max_restarts", "1"))
    launch.wait_for("epoch 2/4 step 1/")
    os.kill(launch.worker(1), signal.SIGKILL)
    rc = launch.finish()
    (tmp_path / "launch.log").write_text(launch.text)
    assert rc == 0, launch.text[-6000:]
    assert "resumed from" in launch.text, launch.text[-3000:]
    runs = tmp_path / "runs"
    a, b = load_file(str(runs / "straight" / "model.safetensors")), load_file(str(runs / "restarted" / "model.safetensors"))
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:3]


def test_the_recipe_features_on_two_processes_survive_a_kill_mid_epoch_bit_for_bit(tmp_path):
    """Repeated augmentation (copies dealt to both processes), progressive resizing, mixup/cutmix,
    BCE, RandAugment, random erasing, clipping and the EMA: a worker killed mid-epoch after the
    size change, both restarted, and the run ends as the uninterrupted one, EMA and metrics included."""
    config = tiny(tmp_path, epochs=3, resume="auto", checkpoint_every_steps=1, keep_last_checkpoints=100, loss="bce", grad_clip_norm=0.5)
    recipe = (
        "loader.batch_size_per_device=2",  # 24 images x 3 copies, 12 per process per epoch: 6 steps
        "aug.repeated_aug=3",
        "input.train_size_schedule=[[0,24],[1,32]]",
        "aug.auto_augment=rand-m6-mstd0.5-inc1",
        "aug.re_prob=0.5",
        "mixup.mixup_alpha=0.1",
        "mixup.cutmix_alpha=1.0",
        "ema.enabled=true",
        "ema.decay=0.9",
    )
    straight = Launch(config, *recipe, "output.run_name=straight")
    assert straight.finish() == 0, straight.text[-3000:]

    launch = Launch(config, *recipe, "output.run_name=restarted", launch_args=("--max_restarts", "1"))
    launch.wait_for("epoch 2/3 step 2/")
    os.kill(launch.worker(1), signal.SIGKILL)
    rc = launch.finish()
    (tmp_path / "launch.log").write_text(launch.text)
    assert rc == 0, launch.text[-6000:]
    resumed = re.search(r"resumed from \S+ \(epoch 2, step (\d+)\)", launch.text)
    assert resumed and 6 < int(resumed.group(1)) < 12, launch.text[-3000:]  # mid-epoch, at the new size

    runs = tmp_path / "runs"
    for weights in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(str(runs / "straight" / weights)), load_file(str(runs / "restarted" / weights))
        assert not [k for k in a if not torch.equal(a[k], b[k])], weights
    timed = ("img_per_s", "epoch_time_s")
    assert [{k: v for k, v in r.items() if k not in timed} for r in read_metrics(runs / "restarted")] == [
        {k: v for k, v in r.items() if k not in timed} for r in read_metrics(runs / "straight")
    ]
