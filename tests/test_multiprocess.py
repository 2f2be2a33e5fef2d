"""Several processes, nothing hangs: Ctrl-C, a stuck process, a lost process, restarts.

Each test launches two CPU processes with `accelerate launch` on a tiny recipe and acts on
one of them by pid (found by a marker in its environment).
"""

from __future__ import annotations

import json
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

    def __init__(self, config: Path, *overrides: str, launch_args: tuple[str, ...] = (), hold: str = "") -> None:
        """`hold`: a moment the training processes wait at for a signal (`trainer.loop.stop.hold_for_test`)."""
        self.marker = f"{os.getpid()}-{time.monotonic_ns()}"
        cmd = [*helpers.two_process_launcher(*launch_args), "trainer", "train", "--config", str(config), *overrides]
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "TRAINER_TEST_RUN": self.marker,
            "TRAINER_TEST_HOLD": hold,
        }
        # NOTE: a session of its own, as a terminal gives a foreground job: Ctrl-C is a SIGINT to its group
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout_s: float = 300) -> None:
        end = time.monotonic() + timeout_s
        while needle not in self.text:
            assert self.proc.poll() is None or needle in self.text, (
                f"exited {self.proc.returncode} before {needle!r}:\n{self.text[-3000:]}"
            )
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

    def marked(self) -> list[int]:
        """Every process of this launch still there: launcher, training processes, loader workers, fork servers."""
        needle = f"TRAINER_TEST_RUN={self.marker}".encode()
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and needle in (proc / "environ").read_bytes().split(b"\0"):
                    if (proc / "stat").read_text().split(")")[-1].split()[0] != "Z":
                        found.append(int(proc.name))
            except OSError:
                continue
        return found

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
    assert (
        line.startswith("trainer: error: process 0: step ")
        and "timed out after backend.collective_timeout_s=4 s waiting in" in line
    ), line
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
    a, b = (
        load_file(str(runs / "straight" / "model.safetensors")),
        load_file(str(runs / "restarted" / "model.safetensors")),
    )
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:3]


def test_the_recipe_features_on_two_processes_survive_a_kill_mid_epoch_bit_for_bit(tmp_path):
    """Repeated augmentation (copies dealt to both processes), progressive resizing, mixup/cutmix,
    BCE, RandAugment, random erasing, clipping and the EMA: a worker killed mid-epoch after the
    size change, both restarted, and the run ends as the uninterrupted one, EMA and metrics included."""
    config = tiny(
        tmp_path,
        epochs=3,
        resume="auto",
        checkpoint_every_steps=1,
        keep_last_checkpoints=100,
        loss="bce",
        grad_clip_norm=0.5,
    )
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


def launch_until_held(config: Path, moment: str, run_name: str) -> Launch:
    launch = Launch(config, f"output.run_name={run_name}", hold=moment)
    end = time.monotonic() + 300
    while launch.text.count(f"test hold: {moment},") < 2:  # both training processes are there
        assert launch.proc.poll() is None and time.monotonic() < end, f"no hold at {moment}:\n{launch.text[-3000:]}"
        time.sleep(0.05)
    return launch


def ctrl_c(launch: Launch) -> float:
    """SIGINT to the launch's whole process group, as a terminal's Ctrl-C; seconds until every process is gone."""
    start = time.monotonic()
    os.killpg(launch.proc.pid, signal.SIGINT)
    launch.proc.wait(timeout=60)
    while launch.marked() and time.monotonic() - start < 60:
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    launch.finish(timeout_s=10)
    return elapsed


def newest_checkpoint(run_dir: Path) -> dict:
    path = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return json.loads((path / "trainer_state.json").read_text())


def test_ctrl_c_in_each_moment_of_a_run_stops_every_process_at_once_and_resume_ends_bit_for_bit(tmp_path):
    """Ctrl-C (SIGINT to every process: launcher, training processes, loader workers, fork servers)
    mid-epoch, during a step checkpoint's save, in validation and between epochs, each followed
    by train.resume=auto; the run then ends with the weights and records of an uninterrupted one.

    Epochs of 3 steps (24 images, 4 per process), a step checkpoint every 2 steps, one loader worker.
    """
    config = tiny(tmp_path, epochs=3, resume="auto", checkpoint_every_steps=2, keep_last_checkpoints=10)
    cfg = yaml.safe_load(config.read_text())
    cfg["loader"].update(workers=1, val_batch_size_per_device=2)
    config.write_text(yaml.safe_dump(cfg))
    straight = Launch(config, "output.run_name=straight")
    assert straight.finish() == 0, straight.text[-3000:]

    run_dir = tmp_path / "runs" / "stopped"
    # moment -> (step, epoch, batches_done) of the newest checkpoint afterwards
    plan = {
        "train_step": (1, 0, 1),  # mid-epoch: the step is checkpointed
        "save": (2, 0, 2),  # the step checkpoint being written is completed, and is the one kept
        "validation": (3, 0, 3),  # epoch 1 trained, not validated: kept as an epoch with every batch done
        "epoch_end": (3, 1, 0),  # epoch 1 validated (first thing on resume), recorded, checkpointed
    }
    exits = {}
    for moment, expected in plan.items():
        launch = launch_until_held(config, moment, "stopped")
        held_at = max((run_dir / "checkpoints").glob("step_*"), default=run_dir)
        inode = held_at.stat().st_ino if held_at.exists() else 0
        exits[moment] = ctrl_c(launch)
        out = launch.text
        (tmp_path / f"{moment}.log").write_text(out)
        assert "Traceback" not in out and "Unable to shutdown process" not in out, out[-3000:]
        for rank in (0, 1):  # torchrun reports a training process's non-zero exit; none here
            assert f"local_rank: {rank} (pid: " not in out, out[-3000:]
        assert f"stop requested: checkpoint saved at step {expected[0]} " in out, out[-3000:]
        state = newest_checkpoint(run_dir)
        assert (state["global_step"], state["epoch"], state["batches_done"]) == expected, (moment, state)
        if moment == "epoch_end":  # saved before the hold, and not saved again (a save replaces the directory)
            assert held_at.name == f"step_{expected[0]:08d}" and held_at.stat().st_ino == inode
    (tmp_path / "exit_s.json").write_text(json.dumps(exits))
    print("exit after Ctrl-C, s:", exits)
    assert max(exits.values()) < 20, exits  # torchrun's SIGKILL comes at 30 s; seconds when nothing waits

    final = Launch(config, "output.run_name=stopped")
    assert final.finish() == 0, final.text[-3000:]
    runs = tmp_path / "runs"
    a, b = (
        load_file(str(runs / "straight" / "model.safetensors")),
        load_file(str(runs / "stopped" / "model.safetensors")),
    )
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    timed = ("img_per_s", "epoch_time_s")
    records = [{k: v for k, v in r.items() if k not in timed} for r in read_metrics(runs / "stopped")]
    assert records == [{k: v for k, v in r.items() if k not in timed} for r in read_metrics(runs / "straight")]
    assert [r["train_samples"] for r in records] == [24, 24, 24]
