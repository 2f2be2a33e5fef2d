"""`trainer export MODEL --to onnx|torchscript`: the val-time model for an inference runtime, checked after export.

Each file gets its input contract beside it (`model.onnx.json`): input name, layout
(NCHW), dtype, size, and that it takes normalized float (RGB in [0, 1], then
(x - mean) / std), with the resize and crop that make such an input from an image. After
export the file is run (onnxruntime, or torch.jit.load) on a batch and compared with the
PyTorch model: the largest logit difference must stay below `LOGIT_BAR` (fp32), and the
top-1 agreement is reported. The batch is the run's own val split through the same decode
and val transform as training where MODEL's run directory is known, else `--images`,
else random inputs; the report says which.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.backend import HOST_DEVICE_TYPE
from trainer.errors import DependencyError, ModelError
from trainer.export_inputs import CheckBatch, check_batch

EXTRA = "pip install 'mlu-imagenet-trainer[export]'"
LOGIT_BAR = 1e-3  # fp32 exports agree with PyTorch to ~1e-6; a real difference is orders above
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def require(modules: tuple[str, ...], purpose: str) -> None:
    """Import `modules` or raise a one-line DependencyError naming the extra that installs them."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise DependencyError(f"{purpose} needs {', '.join(missing)}: {EXTRA}")


def onnx_exporter(requested: str) -> str:
    """The torch.onnx exporter to use: the installed torch's own default unless one is asked for.

    NOTE: torch.onnx.export's `dynamo` default turned True in torch 2.9 (torch/onnx/__init__.py,
    "versionchanged:: 2.9"), where the TorchScript-based exporter became deprecated; torch 2.1
    has no `dynamo` argument: torch.onnx.export is the TorchScript-based exporter there (its
    dynamo exporter is the separate, beta `torch.onnx.dynamo_export`). So: the TorchScript
    exporter where it is torch's default, the torch.export-based one (which needs onnxscript)
    from 2.9 on; both run on torch 2.14.1 (tests/test_export.py checks each).
    """
    if requested != "auto":
        return requested
    default = inspect.signature(torch.onnx.export).parameters.get("dynamo")
    return "dynamo" if default is not None and default.default is True else "torchscript"


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, *, exporter: str, opset: int = 0) -> dict:
    """Write `model` to `path` as ONNX with a dynamic batch axis; returns what was used."""
    needed = ("onnx", "onnxruntime", "onnxscript") if exporter == "dynamo" else ("onnx", "onnxruntime")
    require(needed, f"export --to onnx ({exporter} exporter)")
    kwargs: dict[str, Any] = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    if opset:
        kwargs["opset_version"] = opset
    if exporter == "dynamo":
        if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
            raise ModelError(f"--exporter dynamo: torch {torch.__version__} lacks it; use torchscript")
        # external_data=False: one self-contained file (the weights inline) while under 2 GB
        batch = torch.export.Dim("batch", min=1)
        kwargs.update(dynamo=True, dynamic_shapes=({0: batch},), external_data=False, verbose=False)
    else:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
        if "dynamo" in inspect.signature(torch.onnx.export).parameters:
            kwargs["dynamo"] = False
    # NOTE: the exporters report progress on stdout and deprecations as warnings; our report says what matters
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), **kwargs)
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return {"exporter": exporter, "opset": opset_used, "onnx": onnx.__version__}


def run_onnx(path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A function running the ONNX file in onnxruntime on the CPU, and a description of the runtime."""
    require(("onnxruntime",), "checking the ONNX export")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    run = lambda images: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])  # noqa: E731
    return run, f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)"


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
    """Trace `model` and save it with torch.jit (deprecated in recent torch, still what libtorch loads)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path))
    return {"exporter": "torch.jit.trace"}


def run_torchscript(path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location=HOST_DEVICE_TYPE).eval()
    return (lambda images: loaded(images).detach()), f"torch.jit.load (torch {torch.__version__})"


def input_contract(config: dict[str, Any], input_cfg: dict[str, Any]) -> dict[str, Any]:
    """What the exported model takes and gives, for whoever feeds it outside this trainer."""
    channels, height, width = (int(v) for v in input_cfg["input_size"])
    crop_pct = float(input_cfg["crop_pct"])
    return {
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "shape": ["batch", channels, height, width],
            "normalized": True,
            "color": "RGB",
            "value": "RGB scaled to [0, 1], then (x - mean) / std per channel",
            "mean": [float(v) for v in input_cfg["mean"]],
            "std": [float(v) for v in input_cfg["std"]],
            "preprocess": {
                "resize_shorter_side_to": int(height / crop_pct),
                "interpolation": input_cfg["interpolation"],
                "crop": input_cfg.get("crop_mode", "center"),
                "crop_size": [height, width],
                "crop_pct": crop_pct,
            },
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", int(config["num_classes"])],
            "meaning": "class logits (softmax not applied), index i is label_names[i]",
            "label_names": list(config.get("label_names") or []),
        },
        "architecture": config["architecture"],
    }


def compare(model: torch.nn.Module, run: Callable[[torch.Tensor], torch.Tensor], batch: CheckBatch) -> dict[str, Any]:
    """The largest logit difference and the top-1 agreement between PyTorch and the exported file on `batch`."""
    with torch.no_grad():
        expected = model(batch.images).float()
    got = run(batch.images).float()
    result = {
        "inputs": batch.described,
        "images": int(batch.images.shape[0]),
        "max_abs_logit_diff": float((got - expected).abs().max()),
        "bar": LOGIT_BAR,
        "top1_agreement": float((got.argmax(1) == expected.argmax(1)).float().mean()),
    }
    if batch.labels is not None:
        result["top1_torch"] = float((expected.argmax(1) == batch.labels).float().mean())
        result["top1_exported"] = float((got.argmax(1) == batch.labels).float().mean())
    result["passed"] = result["max_abs_logit_diff"] < LOGIT_BAR
    return result


def export_command(args: Any) -> int:
    """`trainer export MODEL --to onnx [torchscript]`: write, describe and check each format; 2 when a check fails."""
    from trainer.model_folder import data_config, load_model_folder
    from trainer.progress import setup_logging

    setup_logging(True, args.debug)
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):  # the dynamo exporter's optimizer logs each pass at INFO
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.debug else logging.WARNING)
    model, config = load_model_folder(args.model, ema=args.ema)
    model = model.float().eval()  # the val-time model in fp32: no dropout, BatchNorm on its running statistics
    input_cfg = data_config(config)
    batch = check_batch(args.model, input_cfg, images=args.images, samples=args.samples)
    out = Path(args.output).expanduser() if args.output else Path(args.model).expanduser() / "export"
    out.mkdir(parents=True, exist_ok=True)
    contract = input_contract(config, input_cfg)
    example = batch.images[:2]
    failed = []
    for fmt in dict.fromkeys(args.to):
        if fmt == "onnx":
            path = out / "model.onnx"
            used = export_onnx(model, example, path, exporter=onnx_exporter(args.exporter), opset=args.opset)
            run, runtime = run_onnx(path)
        else:
            path = out / "model.pt"
            used = export_torchscript(model, example, path)
            run, runtime = run_torchscript(path)
        check = {**compare(model, run, batch), "runtime": runtime}
        sidecar = path.with_name(path.name + ".json")
        described = {"format": fmt, **used, **contract, "source": str(args.model), "check": check}
        sidecar.write_text(json.dumps(described, indent=2) + "\n")
        print(f"{path}: {fmt} ({', '.join(f'{k} {v}' for k, v in used.items())}); contract {sidecar.name}")
        print(f"  checked on {check['images']} {check['inputs']} in {runtime}")
        diff, agreement = check["max_abs_logit_diff"], check["top1_agreement"]
        print(f"  largest logit difference {diff:.3g} (bar {LOGIT_BAR:g}), top-1 agreement {agreement:.4f}")
        if "top1_torch" in check:
            print(f"  top-1 on these images: PyTorch {check['top1_torch']:.4f}, exported {check['top1_exported']:.4f}")
        if not check["passed"]:
            failed.append(f"{path}: largest logit difference {diff:.3g} is not below {LOGIT_BAR:g}")
    if failed:
        raise ModelError(f"export check failed: {'; '.join(failed)} (files kept for inspection)")
    return 0
