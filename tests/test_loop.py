"""Tests for trainer/loop/: the step boundary and its hooks, lockstep padding, the non-finite guard,
the stop agreement."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from trainer.backend import create_accelerator
from trainer.checkpoint import TrainState
from trainer.errors import TrainingStopped
from trainer.loop.clip import GradClip
from trainer.loop.lockstep import Lockstep, StandIn, is_empty
from trainer.loop.nonfinite import NonFiniteGuard
from trainer.loop.step import OptimizerStep, StepHook
from trainer.loop.stop import StopAgreement
from trainer.loop.tally import EpochTally


class Recorder(StepHook):
    """Records what it saw; has state, so it is checkpointed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.calls, self.count = model, [], 0

    def before_update(self, step: int) -> None:
        grad = self.model.weight.grad
        self.calls.append(("before", step, grad is not None and bool(grad.abs().sum() > 0)))

    def after_update(self, step: int) -> None:
        self.calls.append(("after", step, None))
        self.count += 1

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


def boundary(accum: int) -> tuple[OptimizerStep, torch.nn.Module]:
    acc, _ = create_accelerator("cpu", "fp32", gradient_accumulation_steps=accum)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return OptimizerStep(acc, model, optimizer, scheduler, TrainState()), model


def micro_batch(step: OptimizerStep, model: torch.nn.Module) -> bool:
    with step.accumulate():
        return step.backward(model(torch.ones(3, 4)).sum())


def test_the_boundary_updates_once_per_window_and_calls_hooks_around_it():
    step, model = boundary(accum=2)
    hook = Recorder(model)
    step.add_hook(hook)
    weight = model.weight.detach().clone()
    updates = [micro_batch(step, model) for _ in range(4)]
    assert updates == [False, True, False, True]
    assert step.state.global_step == 2 and hook.count == 2
    # before: gradients complete and not applied; after: the new step count
    assert hook.calls == [("before", 1, True), ("after", 1, None), ("before", 2, True), ("after", 2, None)]
    assert not torch.equal(model.weight, weight)
    assert step.lr == pytest.approx(1.0 / 3)  # the scheduler stepped twice
    assert model.weight.grad is None  # zeroed after each update


def test_stateful_hooks_are_checkpointed_and_others_need_one_method(tmp_path: Path):
    step, model = boundary(accum=1)
    hook = Recorder(model)
    step.add_hook(hook)
    micro_batch(step, model)
    step.accelerator.save_state(str(tmp_path / "ckpt"), safe_serialization=True)
    hook.count = 99
    step.accelerator.load_state(str(tmp_path / "ckpt"))
    assert hook.count == 1
    with pytest.raises(TypeError, match="neither before_update nor after_update"):
        step.add_hook(object())


def test_lockstep_pads_only_when_asked(caplog):
    batches = [{"labels": torch.ones(2)}, {"labels": torch.ones(2)}]
    plain = Lockstep(batches, pad=False, epoch=0, first_batch=0, epoch_batches=4, process_index=0)
    assert list(plain) == batches and not plain.ended
    padded = Lockstep(batches, pad=True, epoch=0, first_batch=1, epoch_batches=4, process_index=1)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        it = iter(padded)
        seen = [next(it) for _ in range(5)]
    assert seen[:2] == batches and padded.ended
    assert all(is_empty(b) and b["skipped"] == [] for b in seen[2:])
    assert "process 1's stream shard ran out after 3 of the epoch's 4 batches" in caplog.text


def test_stand_in_is_the_last_batch_or_blank_images():
    stand_in = StandIn((3, 8, 8), torch.device("cpu"))
    first = stand_in.batch()
    assert (
        first["images"].shape == (2, 3, 8, 8)
        and first["images"].dtype == torch.float32
        and first["labels"].tolist() == [0, 0]
    )
    batch = {"images": torch.ones(1, 3, 8, 8), "labels": torch.tensor([1])}
    stand_in.remember(batch)
    assert stand_in.batch() is batch


def test_guard_stops_after_the_limit_and_vetoes_bad_checkpoints(tmp_path: Path):
    guard = NonFiniteGuard(torch.device("cpu"), limit=2, loss_scaler=False, checkpoints=tmp_path)
    model = torch.nn.Linear(2, 2)
    guard.observe(torch.tensor(1.0))
    assert guard.safe_to_save(model, step=1)
    guard.observe(torch.tensor(float("nan")))
    assert not guard.safe_to_save(model, step=2)  # the latest loss is NaN
    guard.observe(torch.tensor(1.0))
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    assert not guard.safe_to_save(model, step=3)  # the weights overflowed
    guard.observe(torch.tensor(float("inf")))
    guard.observe(torch.tensor(float("nan")))
    with pytest.raises(
        TrainingStopped, match=r"non-finite for 2 consecutive steps, up to step 5 " r".*max_non_finite_steps=2"
    ):
        guard.check(step=5)


def test_guard_decides_with_every_process(tmp_path: Path):
    """A NaN on another process spares this one's checkpoint and stops it too: the decisions are taken together."""
    # what another process reports: its longest streak, latest loss non-finite, weights non-finite
    other = torch.tensor([0, 0, 0])
    guard = NonFiniteGuard(
        torch.device("cpu"),
        limit=3,
        loss_scaler=False,
        checkpoints=tmp_path,
        agree=lambda mine: torch.maximum(mine, other),
    )
    model = torch.nn.Linear(2, 2)
    guard.observe(torch.tensor(1.0))
    assert guard.safe_to_save(model, step=1)
    other[:] = torch.tensor([1, 1, 0])
    assert not guard.safe_to_save(model, step=2)
    other[:] = torch.tensor([1, 0, 1])
    assert not guard.safe_to_save(model, step=3)
    other[:] = torch.tensor([3, 1, 0])
    with pytest.raises(TrainingStopped, match=r"non-finite for 3 consecutive steps, up to step 4"):
        guard.check(step=4)


def test_guard_leaves_overflows_to_the_loss_scaler(tmp_path: Path):
    guard = NonFiniteGuard(torch.device("cpu"), limit=1, loss_scaler=True, checkpoints=tmp_path)
    guard.observe(torch.tensor(float("inf")))
    guard.check(step=1)
    assert guard.safe_to_save(torch.nn.Linear(2, 2), step=1)


def test_stop_agreement_on_one_process_follows_the_signal():
    acc, _ = create_accelerator("cpu", "fp32")
    stop, before = StopAgreement(acc), signal.getsignal(signal.SIGTERM)
    with stop.signals():
        assert not stop.epoch_over(step=10, stream_ended=False, at_log_point=True)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.epoch_over(step=11, stream_ended=False, at_log_point=False)
    assert signal.getsignal(signal.SIGTERM) == before  # put back on the way out


def test_stop_agreement_asks_the_others_at_log_points_only():
    class TwoProcesses:
        num_processes, device = 2, torch.device("cpu")

        def __init__(self, others: list[int]) -> None:
            self.others, self.calls = others, 0

        def reduce(self, flags: torch.Tensor, op: str) -> torch.Tensor:
            self.calls += 1
            return flags + torch.tensor(self.others)

    acc = TwoProcesses(others=[1, 0])  # the other process was signalled
    stop = StopAgreement(acc)
    assert not stop.epoch_over(step=7, stream_ended=False, at_log_point=False) and acc.calls == 0
    assert stop.epoch_over(step=10, stream_ended=False, at_log_point=True) and stop.requested
    ended = StopAgreement(TwoProcesses(others=[0, 1]))
    assert not ended.epoch_over(step=10, stream_ended=False, at_log_point=True)  # only the other's stream ran out
    assert ended.epoch_over(step=20, stream_ended=True, at_log_point=True) and not ended.requested


def test_stop_agreed_between_epochs_takes_any_process_s_stop():
    class Others:
        num_processes, device = 2, torch.device("cpu")

        def __init__(self, other: int) -> None:
            self.other = other

        def reduce(self, flag: torch.Tensor, op: str) -> torch.Tensor:
            return flag + self.other

    assert not StopAgreement(Others(0)).agreed()
    stop = StopAgreement(Others(1))  # the other process was signalled
    assert not stop.asked_here() and stop.agreed() and stop.requested
    assert StopAgreement(Others(0)).adopt(True)  # agreed in the validation all-reduce


def test_a_signal_during_the_agreement_is_answered_as_the_others_answer_then_agreed_next():
    """Else this process alone stops, and the other waits in its next collective (seen: a gloo size mismatch)."""

    class SignalledDuringReduce:
        num_processes, device = 2, torch.device("cpu")

        def reduce(self, flags: torch.Tensor, op: str) -> torch.Tensor:
            stop.requested = True  # the handler runs while the all-reduce waits; the others saw 0
            return flags.clone()

    stop = StopAgreement(SignalledDuringReduce())
    assert not stop.agreed() and stop.requested  # answered as the others did, the request kept
    assert stop.agreed()  # and agreed at the next point
    stop = StopAgreement(SignalledDuringReduce())
    assert not stop.epoch_over(step=3, stream_ended=False, at_log_point=True) and stop.requested


def test_test_hold_waits_for_the_signal_once(monkeypatch, capsys):
    import threading

    from trainer.loop import stop as stop_module

    acc, _ = create_accelerator("cpu", "fp32")
    stop = StopAgreement(acc)
    monkeypatch.setenv(stop_module.HOLD_ENV, "validation")
    monkeypatch.setattr(stop_module, "_received", [])
    monkeypatch.setattr(stop_module, "_held", set())
    stop_module.hold_for_test("save")  # another moment: no wait, no line
    assert "test hold" not in capsys.readouterr().err
    with stop.signals():
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        stop_module.hold_for_test("validation")
        assert stop.requested and 0.2 < time.monotonic() - start < 10
    assert f"test hold: validation, pid {os.getpid()}" in capsys.readouterr().err
    stop_module._received.clear()
    start = time.monotonic()
    stop_module.hold_for_test("validation")  # once per process: no second wait
    assert time.monotonic() - start < 0.1


def test_tally_resumed_mid_epoch_reports_the_whole_epoch():
    acc, _ = create_accelerator("cpu", "fp32")
    clip = GradClip(acc, torch.nn.Linear(2, 2), max_norm=1.0)

    def first_part(tally: EpochTally) -> None:
        tally.window.add(torch.tensor(6.0), torch.tensor(2.0), torch.tensor(3.0))  # loss x n, correct, n
        clip.norms.add(torch.tensor(4.0), torch.tensor(1.0))

    def second_part(tally: EpochTally) -> None:
        tally.window.add(torch.tensor(2.0), torch.tensor(0.0), torch.tensor(1.0))
        tally.skipped += 1
        clip.norms.add(torch.tensor(2.0), torch.tensor(1.0))

    straight = EpochTally(acc, clip)
    straight.start({})
    first_part(straight)
    saved = straight.snapshot()  # what a mid-epoch checkpoint stores
    second_part(straight)
    whole, _ = straight.epoch_metrics(elapsed_s=2.0)

    resumed = EpochTally(acc, clip)  # a new process, after the kill
    resumed.start(saved)
    second_part(resumed)
    rest, _ = resumed.epoch_metrics(elapsed_s=2.0)

    same = ("train_loss", "train_top1", "train_samples", "skipped", "grad_norm")
    assert (
        {k: rest[k] for k in same}
        == {k: whole[k] for k in same}
        == {"train_loss": 2.0, "train_top1": 0.5, "train_samples": 4, "skipped": 1, "grad_norm": 3.0}
    )
    assert (whole["img_per_s"], rest["img_per_s"]) == (2.0, 0.5)  # only the images this run trained on are timed
    resumed.start({})
    assert resumed.epoch_metrics(elapsed_s=1.0)[0]["train_samples"] == 0  # the next epoch starts from nothing
