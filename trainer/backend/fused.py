"""Whether the device runs torch's fused optimizer kernels."""

from __future__ import annotations

from typing import Any


def supports_fused_optimizer(device: Any) -> bool:
    """Whether this device runs torch's fused SGD kernel (probed once on a 1-element step).

    NOTE: with a loss scaler, only a fused optimizer skips an overflowing step on the
    device; any other makes GradScaler read the inf check back with `.item()`, a host
    sync every step. Plugins need not implement the kernel, hence the probe.
    """
    import torch

    try:
        param = torch.zeros(1, device=device)
        torch._fused_sgd_(
            [param],
            [torch.ones_like(param)],
            [],
            weight_decay=0.0,
            momentum=0.0,
            lr=0.1,
            dampening=0.0,
            nesterov=False,
            maximize=False,
            is_first_step=False,
            found_inf=torch.zeros(1, device=device),
        )
        return True
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return False
