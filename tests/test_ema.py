"""WeightsEma over timm's ModelEmaV3: every N steps, warmup by update count, weights-only state."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from trainer.config import EmaConfig
from trainer.ema import EMA_WEIGHTS, create_ema


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def shift(m: torch.nn.Module, by: float) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.add_(by)


def test_off_is_none():
    assert create_ema(EmaConfig(), model()) is None


def test_average_follows_the_decay():
    m = model()
    ema = create_ema(EmaConfig(enabled=True, decay=0.5), m)
    before = m[0].weight.detach().clone()
    shift(m, 1.0)
    ema.after_step(m, 1)  # timm: the first update copies (decay 0 before update 1)
    assert torch.allclose(ema.module[0].weight, before + 1.0)
    shift(m, 1.0)
    ema.after_step(m, 2)
    assert torch.allclose(ema.module[0].weight, before + 1.5)  # 0.5 * (b+1) + 0.5 * (b+2)


def test_updates_only_every_n_steps():
    m = model()
    ema = create_ema(EmaConfig(enabled=True, decay=0.0, every_steps=3), m)
    start = ema.module[0].weight.detach().clone()
    shift(m, 1.0)
    ema.after_step(m, 1), ema.after_step(m, 2)
    assert torch.equal(ema.module[0].weight, start)
    ema.after_step(m, 3)
    assert torch.allclose(ema.module[0].weight, m[0].weight)


def test_warmup_decay_depends_only_on_the_update_count():
    ema = create_ema(EmaConfig(enabled=True, decay=0.9999, warmup=True, warmup_power=0.75), model())
    assert ema.ema.get_decay(10) == pytest.approx(1 - (1 + 9) ** -0.75)


def test_state_round_trips_through_the_checkpoint_file(tmp_path):
    m = model()
    ema = create_ema(EmaConfig(enabled=True, decay=0.7), m)
    for step in range(1, 4):
        shift(m, 0.1)
        ema.after_step(m, step)
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp_path / EMA_WEIGHTS))
    other = create_ema(EmaConfig(enabled=True, decay=0.7), model())
    assert other.load(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), other.state_dict().values()))
    assert not other.load(tmp_path / "elsewhere")


def test_reset_to_copies_the_model_in():
    m = model()
    ema = create_ema(EmaConfig(enabled=True, decay=0.9), m)
    shift(m, 2.0)
    ema.reset_to(m)
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), m.state_dict().values()))
