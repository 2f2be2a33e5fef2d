"""The device stack `trainer doctor` reports: plugin line, versions, scaler, fused kernels,
collective error handling and bf16, each a row with what to do when it is wrong."""

from __future__ import annotations

import os
from typing import Any

from trainer.backend.devices import DEVICE_PLUGINS, device_module
from trainer.backend.fused import fused_sgd_status
from trainer.backend.plugin_lines import error_variables, plugin_torch_line, plugin_version, torch_version
from trainer.backend.precision import is_bf16_supported


def _row(check: str, value: str, problem: str = "") -> dict[str, str]:
    """One row: `problem` is empty when the check passed, else the line saying what to do."""
    return {"check": check, "value": value, "problem": problem}


def _versions(device_type: str) -> list[dict[str, str]]:
    import torch

    plugin = DEVICE_PLUGINS.get(device_type)
    version = plugin_version(plugin) if plugin else None
    if plugin is None or version is None:
        return []
    built_for = plugin_torch_line(version)
    line = f"torch {built_for[0]}.{built_for[1]}" if built_for else "unknown"
    rows = [_row(f"{plugin} line", f"{plugin} {version} (built for {line})")]
    if built_for is None:
        rows.append(_row("versions", f"torch {torch.__version__}, {plugin} {version}"))
    elif built_for != torch_version():
        rows.append(
            _row(
                "versions",
                f"torch {torch.__version__}, {plugin} {version}",
                f"{plugin} {version} is built for torch {built_for[0]}.{built_for[1]} "
                f"but torch is {torch.__version__}: "
                f"install the torch wheel Cambricon ships with this {plugin} (or the {plugin} built for torch "
                f"{torch_version()[0]}.{torch_version()[1]}); a package install that pulled torch from the index "
                "replaced it",
            )
        )
    else:
        rows.append(_row("versions", f"torch {torch.__version__} matches {plugin} {version}"))
    return rows


def _scaler(device_type: str, accelerator: Any) -> dict[str, str]:
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return _row("loss scaler", f"none (precision {accelerator.mixed_precision})")
    name = f"{type(scaler).__module__}.{type(scaler).__qualname__}"
    amp = getattr(device_module(device_type), "amp", None)
    expected = getattr(amp, "GradScaler", None)
    if expected is not None and not isinstance(scaler, expected):
        return _row(
            "loss scaler",
            name,
            f"the scaler is not torch.{device_type}.amp.GradScaler, the class this {device_type} line provides: "
            "leave the scaler to Accelerate (Accelerator(mixed_precision='fp16'))",
        )
    return _row("loss scaler", name)


def _error_handling(device_type: str) -> dict[str, str]:
    names = error_variables(device_type)
    if not names:
        return _row("collective errors", "-")
    shown = ", ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in names.values())
    blocking = os.environ.get(names["blocking"], "0").strip().lower() not in ("", "0", "false")
    asynchronous = os.environ.get(names["async"], "0").strip().lower() not in ("", "0", "false")
    if not (blocking or asynchronous):
        return _row(
            "collective errors",
            shown,
            f"a failed or stuck collective would hang this job: set {names['async']}=1 (the watchdog ends the "
            f"process with its own log line) or {names['blocking']}=1 (the error is raised where the trainer "
            "reports it in one line); this torch line reads only these names",
        )
    mode = "blocking wait: raised in the caller" if blocking else "async: the watchdog ends the process"
    return _row("collective errors", f"{shown} ({mode})")


def device_stack_rows(device_type: str, accelerator: Any, precision: str) -> list[dict[str, str]]:
    """The rows for this device; `precision` is `train.precision` as configured."""
    rows = _versions(device_type)
    rows.append(_scaler(device_type, accelerator))
    fused, why = fused_sgd_status(accelerator.device)
    note = "" if fused else "; the optimizer runs unfused (with a loss scaler, one host sync per step)"
    rows.append(_row("fused SGD", ("yes: " if fused else "no: ") + why + note))
    rows.append(_error_handling(device_type))
    bf16 = is_bf16_supported(device_type)
    bf16_problem = ""
    if not bf16 and precision == "bf16":
        bf16_problem = f"train.precision=bf16 on a {device_type} without bf16: use fp16 or auto"
    rows.append(_row("bf16", "native" if bf16 else "not native (auto picks fp16 with a loss scaler)", bf16_problem))
    return rows
