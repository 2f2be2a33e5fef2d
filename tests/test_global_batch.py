"""The global batch: the accumulation derived from the process count, and what a resume on another count keeps."""

from __future__ import annotations

import pytest

from trainer.checkpoint import TrainState
from trainer.config import load_config
from trainer.doctor import batch_check
from trainer.errors import ConfigError
from trainer.global_batch import BatchPlan, continue_epoch, plan_batch


def test_off_the_launch_decides():
    plan = plan_batch(global_batch_size=0, per_device=8, processes=2, grad_accum_steps=3)
    assert plan == BatchPlan(8, 2, 3) and plan.global_batch == 48 and not plan.fixed


@pytest.mark.parametrize(("processes", "accumulation"), [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_the_accumulation_is_derived_from_the_processes(processes, accumulation):
    plan = plan_batch(global_batch_size=1024, per_device=128, processes=processes, grad_accum_steps=1)
    assert plan.accumulation == accumulation and plan.global_batch == 1024 and plan.round_size == 128 * processes


def test_a_count_that_does_not_divide_is_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        plan_batch(global_batch_size=1024, per_device=128, processes=3, grad_accum_steps=1, source="r.yaml")
    assert str(err.value).startswith(
        "r.yaml: loader.global_batch_size=1024 is not a multiple of loader.batch_size_per_device=128 x 3 processes"
    )
    assert "\n" not in str(err.value)


def test_grad_accum_steps_beside_a_global_batch_is_refused():
    with pytest.raises(ConfigError, match="leave train.grad_accum_steps at 1"):
        plan_batch(global_batch_size=64, per_device=8, processes=1, grad_accum_steps=2)


def test_doctor_shows_the_derived_accumulation_or_the_failure():
    cfg = load_config(None, ["data.root=x", "loader.batch_size_per_device=128", "loader.global_batch_size=1024"])
    assert batch_check(cfg, 4) == (
        "batch: 128/device x 4 processes x 2 accumulation = global 1024 (loader.global_batch_size)",
        "",
    )
    line, failure = batch_check(cfg, 3)
    assert not line and "128 x 3 processes = 384; launch 1, 2, 4, 8 processes" in failure


def test_same_global_batch_on_fewer_processes_keeps_the_schedule_and_says_so():
    state = TrainState(
        epoch=1, batches_done=6, samples_done=24, global_step=6, processes=2, global_batch=12, epoch_samples=48
    )
    plan = plan_batch(global_batch_size=12, per_device=2, processes=1, grad_accum_steps=1)
    go_on = continue_epoch(state, plan, epoch_samples=48, steps_per_epoch=4, epochs=3, streamed=False)
    assert go_on.schedule_step is None and state.batches_done == 12 and state.samples_done == 24
    assert go_on.lines == [
        "resumed on 1 process where the checkpoint had 2: the global "
        "batch stays 12 (2/device x 1 process x 6 accumulation = global "
        "12 "
        "(loader.global_batch_size)), 4 steps per epoch and the lr "
        "schedule unchanged; epoch 2 goes on at sample 24 of 48"
    ]
    assert go_on.change.summary() == "checkpoint: 2 processes, global batch 12; this run: 1 process, global batch 12"


def test_another_global_batch_moves_the_schedule_to_the_same_point_in_epochs():
    state = TrainState(epoch=1, samples_done=24, global_step=6, processes=2, global_batch=12, epoch_samples=48)
    plan = plan_batch(global_batch_size=0, per_device=2, processes=1, grad_accum_steps=1)  # global 2: 24 steps an epoch
    go_on = continue_epoch(state, plan, epoch_samples=48, steps_per_epoch=24, epochs=3, streamed=False)
    assert go_on.schedule_step == 36  # 1.5 epochs of 24 steps
    (line,) = go_on.lines
    assert (
        "resumed with global batch 2" in line
        and ("where the checkpoint had 12 on 2 processes: 24 steps per epoch instead of 4") in line
    )
    assert "lr as given" in line and "from epoch 1.50 (its step 36 of 72) and still ends at epoch 3" in line


def test_a_stream_on_another_count_says_what_it_cannot_guarantee():
    state = TrainState(epoch=0, samples_done=32, global_step=2, processes=2, global_batch=16, epoch_samples=64)
    plan = plan_batch(global_batch_size=16, per_device=8, processes=1, grad_accum_steps=1)
    go_on = continue_epoch(state, plan, epoch_samples=64, steps_per_epoch=4, epochs=2, streamed=True)
    assert state.batches_done == 4  # this process skips 4 of its batches: 32 samples in all
    assert any(
        line.startswith("data.streaming: the stream's shards are dealt anew over 1 process")
        and "seen twice or not at all" in line
        for line in go_on.lines
    )


def test_a_checkpoint_from_before_samples_were_recorded_assumes_the_same_count():
    state = TrainState(epoch=0, batches_done=3, global_step=3)
    go_on = continue_epoch(state, BatchPlan(4, 2, 1), epoch_samples=40, steps_per_epoch=5, epochs=1, streamed=False)
    assert state.samples_done == 24 and not go_on.change and not go_on.lines
