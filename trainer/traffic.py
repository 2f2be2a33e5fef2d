"""Host<->device traffic of the training loop, where the device plugin counts it.

A step that copies more than its batch, or waits for the device, leaves the device idle
while the host catches up; on an accelerator that is lost throughput no profiler flags
by default. Plugins that count copies and syncs (the emulated MLU in tests/emulated_mlu,
through `transfer_stats()` on its device module) let `trainer bench` and the tests see them per step.
Counters are read through `Backend.transfer_stats()`; this module only does arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trainer.backend import Backend


def traffic_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Counter differences `after - before`, key by key."""
    return {key: after[key] - before.get(key, 0) for key in after}


def per_step_traffic(step: Callable[[], Any], backend: Backend, steps: int) -> dict[str, float] | None:
    """Traffic of `steps` calls of `step`, divided by `steps`; None where nothing counts it.

    Untimed on purpose: a timer syncs the device around each step, which would be counted.
    """
    before = backend.transfer_stats()
    if before is None:
        return None
    for _ in range(steps):
        step()
    delta = traffic_delta(before, backend.transfer_stats())
    return {key: value / steps for key, value in delta.items()}


def format_traffic(per_step: dict[str, float]) -> str:
    """One line: copies and bytes each way, and the host waits, per step."""
    return (
        f"h2d {per_step['h2d_copies']:g} copies / {per_step['h2d_bytes']:,.0f} B, "
        f"d2h {per_step['d2h_copies']:g} copies / {per_step['d2h_bytes']:,.0f} B, "
        f"{per_step['syncs']:g} syncs (blocking copies {per_step['h2d_blocking'] + per_step['d2h_blocking']:g}, "
        f".item() {per_step['scalar_reads']:g}, synchronize {per_step['sync_calls']:g})"
    )
