"""Tests for trainer.optim: lr_factor per schedule, the LambdaLR scheduler, create_optimizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

import trainer.optim
from trainer.config import OptimConfig, ScheduleConfig
from trainer.errors import ConfigError
from trainer.optim import create_lr_scheduler, create_optimizer, lr_factor, zero_fused_momentum

# torch 2.1 (the floor stack) has no fused SGD
NO_FUSED_SGD = f"torch {torch.__version__} has no fused SGD"
needs_fused_sgd = pytest.mark.skipif(not trainer.optim._SGD_TAKES_FUSED, reason=NO_FUSED_SGD)

STEPS = 10  # optimizer steps per epoch in these tests


def factors(cfg: ScheduleConfig, epochs: int, steps_per_epoch: int = STEPS) -> list[float]:
    return [lr_factor(s, cfg, steps_per_epoch, epochs) for s in range(epochs * steps_per_epoch + 1)]


def linear_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


# --- lr_factor ----------------------------------------------------------------------------


def test_step_schedule_is_the_recipe_x01_every_30_epochs():
    cfg = ScheduleConfig(name="step", step_epochs=30, gamma=0.1)
    at_epoch = lambda e, within=0: lr_factor(e * STEPS + within, cfg, STEPS, 90)  # noqa: E731
    assert at_epoch(0) == 1.0 and at_epoch(29, STEPS - 1) == 1.0
    assert at_epoch(30) == pytest.approx(0.1) and at_epoch(59, STEPS - 1) == pytest.approx(0.1)
    assert at_epoch(60) == pytest.approx(0.01) and at_epoch(89, STEPS - 1) == pytest.approx(0.01)
    # Constant within an epoch: the reference's StepLR steps per epoch, not per batch.
    assert len({at_epoch(30, i) for i in range(STEPS)}) == 1


def test_cosine_runs_from_one_to_min_ratio_monotonically():
    cfg = ScheduleConfig(name="cosine", min_lr_ratio=0.05)
    values = factors(cfg, epochs=4)
    assert values[0] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.05)
    assert values[len(values) // 2] == pytest.approx(0.05 + 0.95 * 0.5)  # half way: half the range
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
    assert values[1] < values[0]  # it does decay, step by step
    assert lr_factor(10_000, cfg, STEPS, 4) == pytest.approx(0.05)  # past the end it stays at the floor


def test_warmup_is_linear_then_hands_over_to_the_schedule():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=2, warmup_lr_ratio=0.1)
    warm = 2 * STEPS
    values = factors(cfg, epochs=6)
    assert values[0] == pytest.approx(0.1)
    for s in range(warm):
        assert values[s] == pytest.approx(0.1 + 0.9 * s / warm)
    assert values[warm] == pytest.approx(1.0)  # cosine starts from the peak right after warmup
    assert all(b > a for a, b in zip(values[:warm], values[1 : warm + 1]))
    assert values[-1] == pytest.approx(0.0, abs=1e-12)


def test_warmup_with_step_schedule_and_fractional_epochs():
    cfg = ScheduleConfig(name="step", step_epochs=1, gamma=0.5, warmup_epochs=0.5, warmup_lr_ratio=0.0)
    assert lr_factor(0, cfg, STEPS, 3) == 0.0
    assert lr_factor(2, cfg, STEPS, 3) == pytest.approx(0.4)  # 2 of 5 warmup steps
    assert lr_factor(STEPS // 2, cfg, STEPS, 3) == 1.0
    assert lr_factor(STEPS, cfg, STEPS, 3) == pytest.approx(0.5)


def test_constant_schedule():
    assert set(factors(ScheduleConfig(name="constant"), epochs=2)) == {1.0}


def test_warmup_shorter_than_one_step_does_not_divide_by_zero():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=0.5)
    assert lr_factor(0, cfg, 1, 3) == pytest.approx(1.0)


# --- the LambdaLR scheduler ---------------------------------------------------------------


def test_scheduler_sets_lr_from_factor_per_optimizer_step():
    model = linear_model()
    opt = create_optimizer(model, OptimConfig(lr=0.4))
    cfg = ScheduleConfig(name="step", step_epochs=1, gamma=0.5)
    sched = create_lr_scheduler(opt, cfg, steps_per_epoch=3, epochs=4)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.4, 0.4, 0.4, 0.2, 0.2, 0.2, 0.1])


def test_scheduler_state_dict_round_trips_through_json():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1, warmup_lr_ratio=0.1)
    model = linear_model()
    opt = create_optimizer(model, OptimConfig(lr=0.1))
    sched = create_lr_scheduler(opt, cfg, steps_per_epoch=STEPS, epochs=5)
    for _ in range(13):
        opt.step()
        sched.step()
    # The trainer stores it in trainer_state.json, so it must survive JSON.
    state = json.loads(json.dumps(sched.state_dict()))

    model2 = linear_model()
    opt2 = create_optimizer(model2, OptimConfig(lr=0.1))
    sched2 = create_lr_scheduler(opt2, cfg, steps_per_epoch=STEPS, epochs=5)
    assert opt2.param_groups[0]["lr"] != pytest.approx(opt.param_groups[0]["lr"])
    sched2.load_state_dict(state)
    assert sched2.last_epoch == sched.last_epoch == 13
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    for _ in range(5):
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(18, cfg, STEPS, 5))


def test_scheduler_with_zero_steps_per_epoch_does_not_divide_by_zero():
    opt = create_optimizer(linear_model(), OptimConfig(lr=0.1))
    sched = create_lr_scheduler(opt, ScheduleConfig(name="step"), steps_per_epoch=0, epochs=2)
    opt.step()
    sched.step()
    assert math.isfinite(opt.param_groups[0]["lr"])


# --- create_optimizer ---------------------------------------------------------------------


def test_sgd_is_plain_momentum_not_nesterov_by_default():
    model = linear_model()
    opt = create_optimizer(model, OptimConfig())
    assert isinstance(opt, torch.optim.SGD)
    for group in opt.param_groups:
        assert group["nesterov"] is False
        assert group["momentum"] == 0.9
        assert group["weight_decay"] == 1e-4
        assert group["lr"] == 0.1


def test_sgd_hyperparameters_follow_the_config():
    opt = create_optimizer(linear_model(), OptimConfig(lr=0.3, momentum=0.5, weight_decay=5e-5, nesterov=True))
    assert {(g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) for g in opt.param_groups} == {
        (0.3, 0.5, 5e-5, True)
    }


def test_weight_decay_applies_to_every_parameter_like_the_reference():
    model = linear_model()
    opt = create_optimizer(model, OptimConfig(weight_decay=1e-3))
    in_groups = [p for g in opt.param_groups for p in g["params"] if g["weight_decay"] == 1e-3]
    assert {id(p) for p in in_groups} == {id(p) for p in model.parameters()}
    assert len(in_groups) == len(list(model.parameters()))  # biases and norm weights included


@pytest.mark.parametrize(
    "implementation, key, value",
    [
        ("foreach", "foreach", True),
        ("loop", "foreach", False),
        pytest.param("fused", "fused", True, marks=needs_fused_sgd),
    ],
)
def test_implementation_picks_the_step_kernel(implementation, key, value):
    opt = create_optimizer(linear_model(), OptimConfig(implementation=implementation))
    assert opt.param_groups[0][key] is value


def test_fused_sgd_on_a_torch_without_it_is_one_config_error_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(trainer.optim, "_SGD_TAKES_FUSED", False)
    with pytest.raises(ConfigError, match="optim.implementation=fused: torch .* has no fused SGD"):
        create_optimizer(linear_model(), OptimConfig(implementation="fused"))
    opt = create_optimizer(linear_model(), OptimConfig(implementation="auto"), prefer_fused=True)
    assert not opt.param_groups[0].get("fused")


@pytest.mark.parametrize("registry", [True, False], ids=["timm-registry", "timm-before-1.0.12"])
@pytest.mark.parametrize("name", ["sgd", "momentum"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_nesterov_follows_the_config_with_either_timm_factory(monkeypatch, registry, name, nesterov):
    if registry and not hasattr(trainer.optim.timm.optim, "OptimizerRegistry"):
        pytest.skip("this timm has no optimizer registry")
    monkeypatch.setattr(trainer.optim, "_TIMM_TAKES_NESTEROV", registry)
    opt = create_optimizer(linear_model(), OptimConfig(name=name, momentum=0.8, nesterov=nesterov))
    assert isinstance(opt, torch.optim.SGD)
    assert {(g["nesterov"], g["momentum"]) for g in opt.param_groups} == {(nesterov, 0.8)}


def test_sgd_steps_like_torch_sgd():
    torch.manual_seed(0)
    model = linear_model()
    reference = linear_model()
    reference.load_state_dict(model.state_dict())
    ours = create_optimizer(model, OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-4))
    theirs = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(3):
        for m, o in ((model, ours), (reference, theirs)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


def test_adamw_takes_lr_and_weight_decay_without_sgd_arguments():
    opt = create_optimizer(linear_model(), OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    assert {(g["lr"], g["weight_decay"]) for g in opt.param_groups} == {(1e-3, 0.05)}


# --- timm optimizers for the modern recipes ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"), [("sgd", "SGD"), ("adamw", "AdamW"), ("lamb", "Lamb"), ("lars", "Lars"), ("nlars", "Lars")]
)
def test_recipe_optimizers_come_from_timm(name, cls):
    optimizer = create_optimizer(linear_model(), OptimConfig(name=name, lr=0.01, momentum=0.875))
    assert type(optimizer).__name__ == cls
    if name in ("sgd", "lars", "nlars"):
        assert optimizer.param_groups[0]["momentum"] == 0.875
    if name == "nlars":
        assert optimizer.param_groups[0]["nesterov"] is True  # the name's Nesterov survives optim.nesterov=false


def test_no_decay_norm_bias_spares_norm_weights_and_biases():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    optimizer = create_optimizer(model, OptimConfig(name="sgd", weight_decay=3e-5, no_decay_norm_bias=True))
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    decayed = {id(model[0].weight), id(model[3].weight)}
    assert by_decay[3e-5] == decayed
    assert by_decay[0.0] == {id(p) for p in model.parameters()} - decayed  # conv/linear biases and both BN parameters
    plain = create_optimizer(model, OptimConfig(name="sgd", weight_decay=3e-5))
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 3e-5


@needs_fused_sgd
def test_fused_sgd_momentum_starts_at_zero_so_a_skipped_first_step_leaves_no_garbage():
    # A loss scaler skips fp16's overflowing first steps; fused SGD would then read the
    # momentum buffers it allocated with empty_like but never filled.
    torch.manual_seed(0)
    reference, fused = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    fused.load_state_dict(reference.state_dict())
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, foreach=False)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9, fused=True)
    zero_fused_momentum(opt)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in fused.parameters())
    for p in fused.parameters():
        p.grad = torch.full_like(p, float("inf"))
    opt.found_inf = torch.ones(())  # what GradScaler hands a fused optimizer on an overflow
    opt.step()
    del opt.found_inf
    assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in fused.parameters())
    x = torch.randn(8, 4)
    for model, optimizer in ((reference, ref_opt), (fused, opt)):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
    for a, b in zip(reference.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_layer_decay_scales_each_blocks_lr_down_from_the_head_and_the_schedule_keeps_the_ratios():
    import timm

    model = timm.create_model("test_resnet", num_classes=3)
    optimizer = create_optimizer(model, OptimConfig(name="adamw", lr=0.01, weight_decay=0.05, layer_decay=0.5))
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    head, stem = group_of[id(model.fc.weight)], group_of[id(model.conv1[0].weight)]
    assert head["lr"] == pytest.approx(0.01)  # the head trains at optim.lr
    assert stem["lr"] < head["lr"] and stem["lr"] / head["lr"] == pytest.approx(stem["lr_scale"])
    assert len({round(g["lr"], 12) for g in optimizer.param_groups}) >= 3  # stem, blocks and head differ
    assert group_of[id(model.fc.bias)]["weight_decay"] == 0 and head["weight_decay"] == 0.05
    scheduler = create_lr_scheduler(optimizer, ScheduleConfig(name="cosine"), steps_per_epoch=2, epochs=2)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    lrs = scheduler.get_last_lr()
    assert [lr / max(lrs) for lr in lrs] == pytest.approx([g["lr_scale"] for g in optimizer.param_groups])


def test_without_layer_decay_no_group_is_scaled():
    optimizer = create_optimizer(linear_model(), OptimConfig(name="adamw", lr=0.01))
    assert [g["lr"] for g in optimizer.param_groups] == [0.01] * len(optimizer.param_groups)
