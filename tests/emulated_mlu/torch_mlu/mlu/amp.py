"""``torch.mlu.amp``: the loss scaler and autocast of the emulated torch_mlu line.

NOTE: torch_mlu/mlu/amp/grad_scaler.py on r1.22_pt2.1.0 subclasses
``torch.cuda.amp.GradScaler`` (torch 2.1 has no ``torch.amp.GradScaler``) and overrides
``__init__``, ``scale``, ``_unscale_grads_`` and ``update`` so they accept mlu tensors; on
r1.22_pt2.3.0 it is ``torch.amp.GradScaler("mlu")`` under this name, and on r1.22_pt2.4.0
the same with a FutureWarning (``typing_extensions.deprecated``). Accelerate builds its
fp16 scaler from this class on every line.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

import torch

from torch_mlu._line import AT_LEAST_2_3, LINE

__all__ = ["GradScaler", "autocast"]

_HAS_AMP_SCALER = hasattr(torch.amp, "GradScaler")  # torch >= 2.3


def _warn_deprecated(name: str, replacement: str) -> None:
    if LINE == "2.4":
        warnings.warn(
            f"`torch.mlu.amp.{name}(args...)` is deprecated. Please use `{replacement}` instead.",
            FutureWarning,
            stacklevel=3,
        )


if AT_LEAST_2_3:
    if not _HAS_AMP_SCALER:
        needs = f"torch_mlu line {LINE} needs torch >= 2.3 (torch.amp.GradScaler)"
        raise ImportError(f"{needs}; torch is {torch.__version__}")

    class GradScaler(torch.amp.GradScaler):
        """``torch.amp.GradScaler("mlu", ...)`` under torch_mlu's name (2.3 and 2.4 lines)."""

        def __init__(
            self,
            init_scale: float = 2.0**16,
            growth_factor: float = 2.0,
            backoff_factor: float = 0.5,
            growth_interval: int = 2000,
            enabled: bool = True,
        ) -> None:
            _warn_deprecated("GradScaler", "torch.amp.GradScaler('mlu', args...)")
            super().__init__(
                "mlu",
                init_scale=init_scale,
                growth_factor=growth_factor,
                backoff_factor=backoff_factor,
                growth_interval=growth_interval,
                enabled=enabled,
            )

else:

    class GradScaler(torch.cuda.amp.GradScaler):
        """The 2.1 line's scaler: CUDA's scaler class, taught to hold its state on an MLU."""

        def __init__(
            self,
            init_scale: float = 2.0**16,
            growth_factor: float = 2.0,
            backoff_factor: float = 0.5,
            growth_interval: int = 2000,
            enabled: bool = True,
        ) -> None:
            if _HAS_AMP_SCALER:  # a newer torch: its generic scaler does the device work
                torch.amp.GradScaler.__init__(
                    self,
                    "mlu",
                    init_scale=init_scale,
                    growth_factor=growth_factor,
                    backoff_factor=backoff_factor,
                    growth_interval=growth_interval,
                    enabled=enabled,
                )
                return
            # torch 2.1: CUDA's __init__ would disable itself without CUDA; set its state here.
            if enabled and not torch.mlu.is_available():
                warnings.warn("torch_mlu.amp.GradScaler is enabled, but MLU is not available. Disabling.", stacklevel=2)
                enabled = False
            self._enabled = enabled
            if enabled:
                assert growth_factor > 1.0 and backoff_factor < 1.0
                self._init_scale = init_scale
                self._scale = None
                self._growth_factor = growth_factor
                self._backoff_factor = backoff_factor
                self._growth_interval = growth_interval
                self._init_growth_tracker = 0
                self._growth_tracker = None
                self._per_optimizer_states = defaultdict(_fresh_optimizer_state)

        if not _HAS_AMP_SCALER:

            def scale(self, outputs: Any) -> Any:
                """Multiply a tensor (or nested tensors) by the scale, held on the tensor's MLU."""
                if not self._enabled:
                    return outputs
                if isinstance(outputs, torch.Tensor):
                    if self._scale is None:
                        self._lazy_init_scale_growth_tracker(outputs.device)
                    return outputs * self._scale.to(device=outputs.device, non_blocking=True)
                if isinstance(outputs, (list, tuple)):
                    return type(outputs)(self.scale(value) for value in outputs)
                raise ValueError("outputs must be a Tensor or an iterable of Tensors")

            def _unscale_grads_(self, optimizer: Any, inv_scale: Any, found_inf: Any, allow_fp16: bool) -> Any:
                per_device: dict[Any, dict[Any, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
                with torch.no_grad():
                    for group in optimizer.param_groups:
                        for param in group["params"]:
                            if param.grad is None:
                                continue
                            if not allow_fp16 and param.grad.dtype == torch.float16:
                                raise ValueError("Attempting to unscale FP16 gradients.")
                            per_device[param.grad.device][param.grad.dtype].append(param.grad)
                    found = {}
                    for device, by_dtype in per_device.items():
                        found[device] = found_inf.to(device)
                        for grads in by_dtype.values():
                            torch._amp_foreach_non_finite_check_and_unscale_(grads, found[device], inv_scale.to(device))
                return found

            def update(self, new_scale: Any = None) -> None:
                """Back off after a skipped step, grow after ``growth_interval`` clean ones."""
                if not self._enabled:
                    return
                scale, growth_tracker = self._check_scale_growth_tracker("update")
                if new_scale is not None:
                    scale.fill_(float(new_scale))
                else:
                    found_infs = [
                        found.to(device=scale.device, non_blocking=True)
                        for state in self._per_optimizer_states.values()
                        for found in state["found_inf_per_device"].values()
                    ]
                    assert found_infs, "No inf checks were recorded prior to update."
                    combined = found_infs[0]
                    for found in found_infs[1:]:
                        combined += found
                    torch._amp_update_scale_(
                        scale,
                        growth_tracker,
                        combined,
                        self._growth_factor,
                        self._backoff_factor,
                        self._growth_interval,
                    )
                self._per_optimizer_states = defaultdict(_fresh_optimizer_state)


def _fresh_optimizer_state() -> dict[str, Any]:
    from torch.cuda.amp.grad_scaler import OptState

    return {"stage": OptState.READY, "found_inf_per_device": {}}


class autocast(torch.amp.autocast):  # noqa: N801  (mirrors torch.cuda.amp.autocast)
    """``torch.autocast("mlu", ...)`` under torch_mlu's name (deprecated on the 2.4 line)."""

    def __init__(
        self,
        enabled: bool = True,
        dtype: torch.dtype = torch.float16,
        cache_enabled: bool = True,
    ) -> None:
        _warn_deprecated("autocast", "torch.autocast('mlu', args...)")
        super().__init__("mlu", enabled=enabled, dtype=dtype, cache_enabled=cache_enabled)
