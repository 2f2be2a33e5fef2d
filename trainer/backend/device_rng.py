"""The device's own random generator, seeded for a block the way the CPU's is."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from trainer.backend.devices import device_module


@contextmanager
def seeded_device_rng(device: Any, seed: int) -> Iterator[None]:
    """Seed `device`'s generator with `seed` inside the block; restore its state after.

    NOTE: random ops on an accelerator draw from that device's generator, not the CPU's:
    on an MLU the per-device `torch.mlu.default_generators` (torch_mlu/mlu/random.py), as
    on CUDA. Random erasing draws its noise where the batch is, so seeding only the CPU
    generator leaves that noise to whatever the device generator did before; seeded here
    from the same per-batch seed, it depends on (seed, epoch, batch) alone, and a resumed
    run draws what an uninterrupted one did. On the CPU the CPU seeding already covers it.
    """
    import torch

    device = torch.device(device)
    module = device_module(device.type)
    if device.type == "cpu" or module is None or not hasattr(module, "get_rng_state"):
        yield
        return
    index = device.index if device.index is not None else module.current_device()
    saved = module.get_rng_state(index)
    with module.device(index):
        module.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    try:
        yield
    finally:
        module.set_rng_state(saved, index)
