"""Fault injection on the real CLI: kill -9, SIGTERM, corrupt checkpoints, divergence, unwritable output.

Every run is `python -m trainer train` on 16 noise images of 32 px with `test_resnet`
in fp32 on the CPU: 4 steps an epoch, 2 epochs, a checkpoint every step. A run that
was interrupted and resumed must end with weights bit-identical to an uninterrupted
run's; faults the trainer cannot recover from must end it with one line naming the
cause, never a traceback.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
STEPS = 8  # 2 epochs x 16 images / batch 4
pytestmark = pytest.mark.slow


def write_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 8), ("val", 2)):
        for label in "ab":
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
                (root / split / label / f"{i}.JPEG").write_bytes(buffer.getvalue())
    return root


def write_config(tmp: Path, data: Path, run_name: str) -> Path:
    config = {
        "model": {"name": "test_resnet"},
        "data": {"source": "folder", "root": str(data)},
        "loader": {"batch_size_per_device": 4, "workers": 0},
        "input": {"img_size": 32},
        "optim": {"lr": 0.05},
        "train": {
            "epochs": 2,
            "seed": 0,
            "precision": "fp32",
            "channels_last": False,
            "resume": "auto",
            "checkpoint_every_steps": 1,
            "keep_last_checkpoints": 4,
            "log_every_steps": 1,
        },
        "output": {"dir": str(tmp / "runs"), "run_name": run_name, "progress": "log", "plots": False},
    }
    path = tmp / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path, log: Path, *overrides: str) -> subprocess.Popen:
    """Launch a training run; stdout and stderr go to `log` (appended), so pipes never fill."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "trainer", "train", "--config", str(config), *overrides],
            stdout=out,
            stderr=out,
            env=env,
            cwd=config.parent,
        )


def run(config: Path, log: Path, *overrides: str) -> tuple[int, str]:
    """Run to the end; (exit status, this run's output)."""
    offset = log.stat().st_size if log.exists() else 0
    proc = start(config, log, *overrides)
    try:
        status = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return status, log.read_text()[offset:]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_bit_identical(actual: Path, expected: dict[str, torch.Tensor]) -> None:
    got = weights(actual)
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def one_error_line(output: str) -> str:
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("trainer: error:")]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


def epochs_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return (
        [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("faults") / "data")


@pytest.fixture(scope="module")
def reference(data: Path) -> Path:
    """The uninterrupted run every interrupted one must match."""
    tmp = data.parent
    status, output = run(write_config(tmp, data, "reference"), tmp / "reference.log")
    assert status == 0, output[-3000:]
    return tmp / "runs" / "reference"


@pytest.fixture(scope="module")
def reference_weights(reference: Path) -> dict[str, torch.Tensor]:
    return weights(reference / "model.safetensors")


# -- (a) kill -9 at random moments, resume until done ------------------------------------
def name(step: int) -> str:
    return f"step_{step:08d}"


def kill_when(
    proc: subprocess.Popen, checkpoints: Path, trigger: Callable[[list[str]], str | None], timeout_s: float = 300
) -> str | None:
    """Poll the checkpoints dir every millisecond; SIGKILL the run once `trigger` names a moment."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            names = os.listdir(checkpoints)
        except FileNotFoundError:
            names = []
        moment = trigger(names)
        if moment:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return moment
        time.sleep(0.001)
    return None


def during_save(step: int) -> Callable[[list[str]], str | None]:
    """While `.tmp-step_N` exists (the save is half written); just after, if the poll missed it."""

    def trigger(names: list[str]) -> str | None:
        if f".tmp-{name(step)}" in names:
            return f"while .tmp-{name(step)} was being written"
        return (
            (f"just after {name(step)} was renamed into place (its .tmp- phase was missed)")
            if name(step) in names
            else None
        )

    return trigger


def after(step: int, delay_s: float) -> Callable[[list[str]], str | None]:
    seen: list[float] = []

    def trigger(names: list[str]) -> str | None:
        if name(step) in names and not seen:
            seen.append(time.monotonic())
        return (
            f"{delay_s:.3f} s after {name(step)} appeared" if seen and time.monotonic() - seen[0] >= delay_s else None
        )

    return trigger


@pytest.fixture(scope="module")
def killed_run(data: Path, reference: Path) -> dict:
    """Kill -9 at 4 moments chosen by a seeded RNG, resuming with resume=auto after each."""
    tmp, rng = data.parent, random.Random(20240607)
    config, log = write_config(tmp, data, "killed"), tmp / "killed.log"
    run_dir = tmp / "runs" / "killed"
    plan = [
        during_save(rng.randint(1, 3)),
        after(4, 0.0),  # just after the epoch-end checkpoint, whose metrics record came first
        after(rng.choice([5, 6]), rng.uniform(0.0, 0.5)),
        during_save(7),
    ]
    kills = []
    for trigger in plan:
        proc = start(config, log)
        moment = kill_when(proc, run_dir / "checkpoints", trigger)
        assert moment is not None and proc.returncode == -signal.SIGKILL, (
            f"run ended ({proc.returncode}) before the kill: {log.read_text()[-2000:]}"
        )
        kills.append(moment)
    status, output = run(config, log)
    assert status == 0, output[-3000:]
    return {"run_dir": run_dir, "kills": kills}


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(killed_run: dict, reference_weights: dict) -> None:
    print("kill points survived:", *killed_run["kills"], sep="\n  ")
    assert len(killed_run["kills"]) == 4
    assert_bit_identical(killed_run["run_dir"] / "model.safetensors", reference_weights)
    assert not [p for p in (killed_run["run_dir"] / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert sorted(set(epochs_logged(killed_run["run_dir"]))) == epochs_logged(killed_run["run_dir"])  # none twice


def test_sigkill_at_epoch_end_loses_no_metrics_record(killed_run: dict) -> None:
    assert epochs_logged(killed_run["run_dir"]) == [0, 1]


# -- (b) SIGTERM mid-epoch ----------------------------------------------------------------
def test_sigterm_mid_epoch_checkpoints_exits_0_and_resumes_exactly(data: Path, reference_weights: dict) -> None:
    tmp = data.parent
    config, log = write_config(tmp, data, "sigterm"), tmp / "sigterm.log"
    run_dir = tmp / "runs" / "sigterm"
    # Step checkpoints off: the only mid-epoch checkpoint is then the one SIGTERM causes.
    proc = start(config, log, "train.checkpoint_every_steps=0")
    deadline = time.monotonic() + 300
    while "epoch 1/2 step 1/4" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    saved = re.search(r"stop requested: checkpoint saved at step (\d+)", log.read_text())
    assert saved, log.read_text()[-3000:]
    step = int(saved.group(1))
    assert 1 <= step < 4  # mid-epoch 1: the loop stops at the first step boundary after the signal
    state = json.loads((run_dir / "checkpoints" / name(step) / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (0, step, step)
    status, output = run(config, log, "train.checkpoint_every_steps=0")
    assert status == 0, output[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / name(step)}" in output
    assert_bit_identical(run_dir / "model.safetensors", reference_weights)


# -- (c) corrupted newest checkpoint ------------------------------------------------------
def truncate_model(path: Path) -> None:
    target = path / "model.safetensors"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])


def delete_optimizer(path: Path) -> None:
    (path / "optimizer.bin").unlink()


@pytest.mark.parametrize(
    "corrupt",
    [
        delete_optimizer,
        truncate_model,
    ],
)
def test_corrupt_newest_checkpoint_falls_back_to_previous(
    corrupt: Callable[[Path], None], data: Path, reference: Path, reference_weights: dict, tmp_path: Path
) -> None:
    # The finished reference run, its newest checkpoint (step 8, the end) broken: resume=auto
    # must say so, resume from step 7 and train step 8 again.
    shutil.copytree(reference, tmp_path / "runs" / "corrupt")
    checkpoints = tmp_path / "runs" / "corrupt" / "checkpoints"
    (tmp_path / "runs" / "corrupt" / "model.safetensors").unlink()
    corrupt(checkpoints / name(STEPS))
    config = write_config(tmp_path, data, "corrupt")
    status, output = run(config, tmp_path / "corrupt.log")
    assert status == 0, output[-3000:]
    warnings = [line for line in output.splitlines() if "WARNING" in line and str(checkpoints / name(STEPS)) in line]
    assert len(warnings) == 1, output[-3000:]
    assert f"resumed from {checkpoints / name(STEPS - 1)}" in output
    assert_bit_identical(tmp_path / "runs" / "corrupt" / "model.safetensors", reference_weights)


def test_no_loadable_checkpoint_never_trains_on_half_loaded_weights(
    data: Path, reference: Path, reference_weights: dict, tmp_path: Path
) -> None:
    # Only the epoch-1 checkpoint is left, and it is broken: the run must either refuse with
    # one line, or start truly fresh (and so match the uninterrupted run).
    run_dir = tmp_path / "runs" / "broken"
    shutil.copytree(reference / "checkpoints" / name(4), run_dir / "checkpoints" / name(4))
    delete_optimizer(run_dir / "checkpoints" / name(4))
    config = write_config(tmp_path, data, "broken")
    status, output = run(config, tmp_path / "broken.log")
    if status != 0:
        assert str(run_dir / "checkpoints") in one_error_line(output)
    else:
        assert_bit_identical(run_dir / "model.safetensors", reference_weights)


# -- (d) non-finite loss ------------------------------------------------------------------
def test_non_finite_loss_stops_with_one_line_and_no_nan_checkpoint(data: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, data, "diverged")
    status, output = run(config, tmp_path / "diverged.log", "optim.lr=1e30", "train.max_non_finite_steps=3")
    assert status != 0
    line = one_error_line(output)
    assert "non-finite" in line and re.search(r"step \d+", line), line
    checkpoints = sorted((tmp_path / "runs" / "diverged" / "checkpoints").glob("step_*"))
    assert checkpoints, "the steps before divergence should have been checkpointed"
    for path in checkpoints:
        tensors = [*weights(path / "model.safetensors").values()]
        optimizer = torch.load(path / "optimizer.bin", weights_only=True)
        tensors += [v for s in optimizer["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), f"{path} holds non-finite values"


def test_non_finite_weights_after_a_finite_loss_are_not_checkpointed(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An update can overflow weights while the loss it came from was finite; the loss
    # check alone would checkpoint them, and resume=auto would then start from inf.
    from trainer.config import load_config
    from trainer.train import Trainer

    trainer = Trainer(load_config(write_config(tmp_path, data, "overflowed")))
    trainer.run.prepare()
    trainer._save_checkpoint()
    assert len(list(trainer.checkpoints.directory.glob("step_*"))) == 1
    trainer.state.global_step = 1
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("inf")
    with caplog.at_level("WARNING", logger="trainer"):
        trainer._save_checkpoint()
    assert len(list(trainer.checkpoints.directory.glob("step_*"))) == 1
    assert "step 1: the weights hold non-finite values; checkpoint not saved" in caplog.text
    trainer.close()


# -- (e) output that cannot be written ----------------------------------------------------
def test_a_full_disk_is_one_line_and_keeps_earlier_checkpoints(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # safetensors reports a failed write as its own SafetensorError, not an OSError
    from safetensors import SafetensorError

    from trainer import checkpoint as checkpoint_module
    from trainer.checkpoint import CheckpointError
    from trainer.config import load_config
    from trainer.train import Trainer

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    trainer = Trainer(load_config(write_config(tmp_path, data, "full")))
    trainer.run.prepare()
    trainer._save_checkpoint()
    trainer.state.global_step = 1
    monkeypatch.setattr(trainer.accelerator, "save_state", disk_full)
    with pytest.raises(
        CheckpointError,
        match=r"\.tmp-step_00000001: checkpoint write failed \(No space left on "
        r"device \(os error 28\)\); earlier checkpoints are intact",
    ):
        trainer._save_checkpoint()
    assert [p.name for p in trainer.checkpoints.directory.iterdir()] == ["step_00000000"]
    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    with pytest.raises(
        CheckpointError,
        match=r"model: writing the final weights failed \(No space left on "
        r"device .*train.resume=auto writes them again",
    ):
        trainer.run.export(trainer.model, classes=trainer.data.classes, input_config=trainer.data.data_config)
    # nothing part-written left
    assert not (trainer.run.path / "model").exists() and not list(trainer.run.path.glob(".tmp-*"))
    trainer.close()


@pytest.mark.parametrize("blocked", ["output_dir_is_a_file", "read_only_output_dir", "checkpoints_path_is_a_file"])
def test_unwritable_output_is_one_line_naming_it(blocked: str, data: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, data, "run")
    runs = tmp_path / "runs"
    if blocked == "output_dir_is_a_file":
        runs.write_text("not a directory")
        named = runs / "run"
    elif blocked == "read_only_output_dir":
        if os.geteuid() == 0:
            pytest.skip("root writes through a read-only directory mode")
        runs.mkdir()
        runs.chmod(0o555)
        named = runs / "run"
    else:  # training starts, then its first checkpoint cannot be written
        (runs / "run").mkdir(parents=True)
        (runs / "run" / "checkpoints").write_text("not a directory")
        named = runs / "run" / "checkpoints"
    try:
        status, output = run(config, tmp_path / "run.log", "train.epochs=1")
    finally:
        if runs.is_dir():
            runs.chmod(0o755)
    assert status != 0
    assert str(named) in one_error_line(output)
