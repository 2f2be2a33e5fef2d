"""``torch.mlu.amp``: deprecated aliases kept because Accelerate still uses them.

Accelerate 1.x builds its fp16 scaler with ``torch.mlu.amp.GradScaler``; like
torch_mlu from its 2.4 branch on, these warn and forward to ``torch.amp``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["GradScaler", "autocast"]


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler("mlu", ...)`` under its deprecated name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn(
            "torch.mlu.amp.GradScaler(args...) is deprecated. Please use torch.amp.GradScaler('mlu', args...) instead.",
            FutureWarning,
            stacklevel=2,
        )
        super().__init__("mlu", *args, **kwargs)


class autocast(torch.amp.autocast):  # noqa: N801  (mirrors torch.cuda.amp.autocast)
    """``torch.autocast("mlu", ...)`` under its deprecated name."""

    def __init__(
        self,
        enabled: bool = True,
        dtype: torch.dtype = torch.float16,
        cache_enabled: bool = True,
    ) -> None:
        warnings.warn(
            "torch.mlu.amp.autocast(args...) is deprecated. Please use torch.autocast('mlu', args...) instead.",
            FutureWarning,
            stacklevel=2,
        )
        super().__init__("mlu", enabled=enabled, dtype=dtype, cache_enabled=cache_enabled)
