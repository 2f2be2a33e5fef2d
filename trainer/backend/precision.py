"""Precision: native bf16 support, and `train.precision` as Accelerate's `mixed_precision`."""

from __future__ import annotations

from trainer.backend.devices import device_module
from trainer.errors import BackendError

MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}


def is_bf16_supported(device_type: str) -> bool:
    """Native bf16 support; on CPU, oneDNN's check for bf16 instructions."""
    if device_type == "cpu":
        import torch

        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    if device_type == "mps":
        return False
    module = device_module(device_type)
    check = getattr(module, "is_bf16_supported", None)
    return bool(check()) if check else False


def resolve_precision(requested: str, device_type: str) -> str:
    """Map `train.precision` to Accelerate's `mixed_precision` ("no", "fp16" or "bf16").

    auto gives bf16 where the device has it natively; otherwise fp16 with a loss scaler
    on accelerators (MLU370 has no bf16) and fp32 on CPU.
    """
    if requested == "auto":
        if is_bf16_supported(device_type):
            return "bf16"
        return "fp16" if device_type not in ("cpu", "mps") else "no"
    if requested == "bf16" and not is_bf16_supported(device_type):
        raise BackendError(f"train.precision=bf16: this {device_type} has no native bf16; use fp16 or fp32 (or auto)")
    if requested == "fp16" and device_type == "cpu":
        raise BackendError("train.precision=fp16 needs an accelerator; on cpu use bf16 (if supported) or fp32")
    return MIXED_PRECISION[requested]


def precision_name(mixed_precision: str) -> str:
    """Accelerate's `mixed_precision` ("no", "fp16", "bf16") as the config spells it."""
    return {v: k for k, v in MIXED_PRECISION.items()}[mixed_precision]
