"""Tests for trainer.checkpoint with a real in-process Accelerator on the CPU."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from trainer.checkpoint import STATE_FILE, CheckpointError, CheckpointManager, TrainState, export_weights
from trainer.config import OptimConfig, ScheduleConfig
from trainer.optim import create_lr_scheduler, create_optimizer


@pytest.fixture
def run():
    """A prepared model, optimizer and scheduler; the Accelerator state is reset afterwards."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    optimizer = create_optimizer(model, OptimConfig(lr=0.1))
    scheduler = create_lr_scheduler(optimizer, ScheduleConfig(name="cosine"), steps_per_epoch=4, epochs=3)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    yield accelerator, model, optimizer, scheduler
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_steps(run, n: int) -> None:
    accelerator, model, optimizer, scheduler = run
    for _ in range(n):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def save(manager: CheckpointManager, run, step: int, best: str = "") -> Path:
    return manager.save(
        TrainState(epoch=step // 4, batches_done=step % 4, global_step=step, best_checkpoint=best), run[3]
    )


def test_save_writes_a_step_directory_with_trainer_state(run, tmp_path):
    manager = CheckpointManager(run[0], tmp_path / "checkpoints", keep_last=2)
    train_steps(run, 3)
    path = manager.save(TrainState(epoch=0, batches_done=3, global_step=3, best_val_top1=0.25), run[3])
    assert path == tmp_path / "checkpoints" / "step_00000003"
    state = json.loads((path / STATE_FILE).read_text())
    assert (
        state["epoch"] == 0
        and state["batches_done"] == 3
        and state["global_step"] == 3
        and state["best_val_top1"] == 0.25
    )
    assert state["scheduler"]["last_epoch"] == 3  # the scheduler's state rides along
    names = {p.name for p in path.iterdir()}
    assert "model.safetensors" in names and any(n.startswith("optimizer") for n in names)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert manager.checkpoints() == [path]


def test_saving_the_same_step_again_replaces_it(run, tmp_path):
    manager = CheckpointManager(run[0], tmp_path, keep_last=2)
    save(manager, run, 4)
    (tmp_path / "step_00000004" / "stale").write_text("from the first save")
    save(manager, run, 4)
    assert not (tmp_path / "step_00000004" / "stale").exists()
    assert manager.checkpoints() == [tmp_path / "step_00000004"]


def test_keep_last_and_best_are_retained_others_pruned(run, tmp_path):
    manager = CheckpointManager(run[0], tmp_path, keep_last=2)
    for step in (1, 2, 3, 4, 5, 6):
        save(manager, run, step, best="step_00000002")
    assert [p.name for p in manager.checkpoints()] == ["step_00000002", "step_00000005", "step_00000006"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000005", "step_00000006"]


def test_checkpoints_are_ordered_by_step_number_not_name(run, tmp_path):
    manager = CheckpointManager(run[0], tmp_path, keep_last=5)
    for step in (9, 10, 100_000_000):  # the last one has more than 8 digits
        save(manager, run, step)
    assert [p.name for p in manager.checkpoints()] == ["step_00000009", "step_00000010", "step_100000000"]


def test_incomplete_and_temporary_directories_are_not_checkpoints(run, tmp_path):
    manager = CheckpointManager(run[0], tmp_path, keep_last=2)
    save(manager, run, 1)
    leftover = tmp_path / ".tmp-step_00000007"  # a save killed before its rename
    leftover.mkdir()
    (leftover / STATE_FILE).write_text("{}")
    (tmp_path / "step_00000008").mkdir()  # no trainer_state.json: not complete
    assert [p.name for p in manager.checkpoints()] == ["step_00000001"]
    assert [p.name for p in manager.resolve("auto")] == ["step_00000001"]
    save(manager, run, 2)
    assert not leftover.exists()  # cleaned by the next save
    assert [p.name for p in manager.checkpoints()] == ["step_00000001", "step_00000002"]


def test_no_directory_means_no_checkpoints(run, tmp_path):
    manager = CheckpointManager(run[0], tmp_path / "absent", keep_last=2)
    assert manager.checkpoints() == [] and manager.resolve("auto") == []
    assert manager.resolve("") == []


def test_resolve_auto_is_newest_first(run, tmp_path):
    manager = CheckpointManager(run[0], tmp_path, keep_last=3)
    for step in (2, 4, 6):
        save(manager, run, step)
    assert [p.name for p in manager.resolve("auto")] == ["step_00000006", "step_00000004", "step_00000002"]


def test_resolve_a_path(run, tmp_path):
    manager = CheckpointManager(run[0], tmp_path / "ckpt", keep_last=2)
    path = save(manager, run, 3)
    assert manager.resolve(str(path)) == [path]
    with pytest.raises(CheckpointError, match="train.resume") as err:
        manager.resolve(str(tmp_path / "ckpt"))  # the parent directory, not a checkpoint
    assert str(tmp_path / "ckpt") in str(err.value) and STATE_FILE in str(err.value)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        manager.resolve(str(tmp_path / "nowhere"))


def test_load_restores_model_optimizer_scheduler_and_state(run, tmp_path):
    accelerator, model, optimizer, scheduler = run
    manager = CheckpointManager(accelerator, tmp_path, keep_last=2)
    train_steps(run, 5)
    saved_state = TrainState(epoch=1, batches_done=1, global_step=5, best_val_top1=0.5, best_checkpoint="step_00000005")
    path = manager.save(saved_state, scheduler)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    lr = optimizer.param_groups[0]["lr"]
    torch.manual_seed(1234)
    expected_next = torch.rand(3)

    train_steps(run, 3)  # move everything on
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert optimizer.param_groups[0]["lr"] != lr

    loaded = manager.load(path)
    assert asdict(loaded) == asdict(saved_state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    for p, buf in zip(model.parameters(), momentum):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], buf)
    assert scheduler.scheduler.last_epoch == 5 and optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    # Accelerate restores the RNG states saved at checkpoint time.
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(3), expected_next)


def test_load_of_a_broken_checkpoint_is_a_checkpoint_error(run, tmp_path):
    manager = CheckpointManager(run[0], tmp_path, keep_last=2)
    path = save(manager, run, 1)
    (path / STATE_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable checkpoint") as err:
        manager.load(path)
    assert str(path) in str(err.value)
    path = save(manager, run, 2)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=str(path)):
        manager.load(path)


def test_unwritable_directory_is_a_checkpoint_error(run, tmp_path):
    blocker = tmp_path / "checkpoints"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(CheckpointError, match="checkpoint write failed"):
        save(CheckpointManager(run[0], blocker, keep_last=2), run, 1)


def test_export_weights_writes_safetensors_atomically(tmp_path):
    from safetensors.torch import load_file

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    path = export_weights(model, tmp_path / "model.safetensors")
    assert path == tmp_path / "model.safetensors"
    loaded = load_file(str(path))
    assert loaded.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left
