"""configs/slurm: the per-machine launch line as 2 "machines" on localhost, and the batch
script's stop-and-requeue before the time limit (srun and scontrol stood in for)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import helpers

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "configs" / "slurm"
pytestmark = pytest.mark.slow


def tiny(tmp_path: Path, epochs: int = 2) -> Path:
    data = helpers.make_image_folder(tmp_path / "data", train_per_class=8)
    cfg = {
        "model": {"name": "test_resnet"},
        "data": {"root": str(data)},
        "loader": {"batch_size_per_device": 4, "workers": 0},
        "input": {"img_size": 32},
        "train": {"epochs": epochs, "precision": "fp32", "channels_last": False, "log_every_steps": 1},
        "output": {"dir": str(tmp_path / "runs"), "plots": False, "progress": "log"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def slurm_env(tmp_path: Path, config: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "CONFIG": str(config),
        "ACCELERATE_CONFIG": str(REPO / "configs/accelerate/cpu_2proc.yaml"),
        "MAIN_ADDR": "127.0.0.1",
        "MAIN_PORT": str(helpers.free_port()),
        **extra,
    }


def test_launch_line_on_two_machines_trains_like_one_machine_with_two_processes(tmp_path):
    config = tiny(tmp_path)
    env = slurm_env(tmp_path, config, SLURM_JOB_NUM_NODES="2", DEVICES_PER_NODE="1")
    machines = [
        subprocess.Popen(
            ["bash", str(SLURM / "launch_machine.sh"), "output.run_name=two_machines"],
            cwd=REPO,
            env={**env, "SLURM_NODEID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [m.communicate(timeout=300)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 process(es)" in outputs[0], outputs[0][-3000:]
    one = subprocess.run(
        [*helpers.two_process_launcher(), "trainer", "train", "--config", str(config), "output.run_name=one_machine"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(str(tmp_path / "runs" / "two_machines" / "model.safetensors"))
    b = load_file(str(tmp_path / "runs" / "one_machine" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch_script_saves_and_requeues_before_the_time_limit_then_resumes(tmp_path):
    config = tiny(tmp_path, epochs=300)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun: this one machine's task; scontrol: the head node's name, and a record of the requeue.
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexport SLURM_NODEID=0\nexec "$@"\n'
    )
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\nif [ "$1" = show ]; then echo 127.0.0.1; else echo "$@" >> {tmp_path / "scontrol.log"}; fi\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = slurm_env(
        tmp_path,
        config,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_NODELIST="localhost",
        DEVICES_PER_NODE="2",
    )
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.pop("MAIN_ADDR")
    log = tmp_path / "job.out"
    with open(log, "w") as out:
        job = subprocess.Popen(
            ["bash", str(SLURM / "train.sbatch"), "output.run_name=job"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        end = time.monotonic() + 300
        while "epoch 2/300 step 1/" not in log.read_text():
            assert job.poll() is None and time.monotonic() < end, log.read_text()[-3000:]
            time.sleep(0.1)
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@600 sends before the time limit
        assert job.wait(timeout=60) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "stop requested: checkpoint saved at step" in text, text[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    # The requeued job: the same script, resumed from the checkpoint, stopped again at once.
    env["MAIN_PORT"] = str(helpers.free_port())
    again = subprocess.Popen(
        ["bash", str(SLURM / "train.sbatch"), "output.run_name=job", "train.epochs=3"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output[-3000:]
    assert "resumed from" in output and (tmp_path / "runs" / "job" / "model.safetensors").is_file(), output[-3000:]
