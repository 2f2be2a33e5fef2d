"""Tests for trainer.export: ONNX / TorchScript files with their input contract, checked on real val images."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys

import pytest
import timm
import torch

import helpers
from trainer.checkpoint import export_weights
from trainer.config import load_config, save_config
from trainer.errors import DependencyError, ModelError
from trainer.export import LOGIT_BAR, export_command, onnx_exporter

pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")

NAME = "test_resnet"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run's directory as a run leaves it: config.yaml and model.safetensors, 3 classes of 9 val images."""
    tmp = tmp_path_factory.mktemp("export")
    root = helpers.make_image_folder(tmp / "data", classes=3, size=(48, 40))
    overrides = [f"data.root={root}", f"model.name={NAME}", "input.img_size=32", "input.crop_pct=0.875"]
    overrides += ["input.mean=[0.5, 0.4, 0.3]", "input.std=[0.2, 0.25, 0.3]", "input.interpolation=bicubic"]
    cfg = load_config(None, [*overrides, f"output.dir={tmp}"])
    run = tmp / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=3)
    with torch.no_grad():  # trained-looking BatchNorm statistics: the val-time model must use them
        for name, tensor in model.state_dict().items():
            if "running_var" in name:
                tensor.uniform_(0.5, 2.0)
            elif tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.05)
    export_weights(model, run / "model.safetensors")
    return run


def args(model, **kwargs) -> argparse.Namespace:
    # the TorchScript-based exporter unless a test asks: seconds faster than torch.export on a test model
    base = dict(to=["onnx"], output=None, ema=False, images=[], samples=8, exporter="torchscript", opset=0, debug=False)
    return argparse.Namespace(model=str(model), **{**base, **kwargs})


# torch.export: ~5-30 s
@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_onnx_export_writes_the_contract_and_matches_pytorch_on_the_val_split(run, tmp_path, exporter, capsys):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    out = tmp_path / "out"
    assert export_command(args(run, output=str(out), exporter=exporter)) == 0
    sidecar = json.loads((out / "model.onnx.json").read_text())
    contract = sidecar["input"]
    assert (contract["layout"], contract["dtype"], contract["normalized"]) == ("NCHW", "float32", True)
    assert contract["shape"] == ["batch", 3, 32, 32]
    assert contract["mean"] == pytest.approx([0.5, 0.4, 0.3]) and contract["std"] == pytest.approx([0.2, 0.25, 0.3])
    preprocess = contract["preprocess"]
    assert preprocess["interpolation"] == "bicubic" and preprocess["resize_shorter_side_to"] == 36
    assert sidecar["output"]["shape"] == ["batch", 3] and sidecar["exporter"] == exporter
    check = sidecar["check"]
    assert check["inputs"].startswith("val images of the run's data") and check["images"] == 8
    assert check["max_abs_logit_diff"] < LOGIT_BAR and check["top1_agreement"] == 1.0 and check["passed"]
    assert check["top1_exported"] == check["top1_torch"]
    printed = capsys.readouterr().out
    assert "largest logit difference" in printed and "top-1 agreement 1.0000" in printed

    # The file alone, in onnxruntime, at another batch size: the batch axis is dynamic.
    import onnxruntime

    from trainer.model_folder import load_model_folder

    model, _ = load_model_folder(run)
    images = torch.randn(5, 3, 32, 32)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(images), atol=1e-4, rtol=1e-4)


def test_torchscript_export_is_checked_too(run, tmp_path):
    assert export_command(args(run, output=str(tmp_path), to=["torchscript"])) == 0
    check = json.loads((tmp_path / "model.pt.json").read_text())["check"]
    assert check["max_abs_logit_diff"] < LOGIT_BAR and check["top1_agreement"] == 1.0


def test_a_difference_above_the_bar_fails_with_one_line(run, tmp_path, monkeypatch):
    import trainer.export as export

    real = export.run_onnx

    def off_by_a_bit(path):
        run_file, runtime = real(path)
        return (lambda images: run_file(images) + 2 * LOGIT_BAR), runtime

    monkeypatch.setattr(export, "run_onnx", off_by_a_bit)
    with pytest.raises(ModelError, match=r"failed: .*model\.onnx: largest logit difference 0\.002 is not below 0\.001"):
        export_command(args(run, output=str(tmp_path)))
    assert not json.loads((tmp_path / "model.onnx.json").read_text())["check"]["passed"]


def test_without_a_run_the_check_says_it_used_random_inputs(run, tmp_path, capsys):
    from trainer.model_folder import load_model_folder

    model, _ = load_model_folder(run)
    folder = tmp_path / "folder"
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    assert export_command(args(folder, output=str(tmp_path / "out"))) == 0
    assert "names no run, so no val split: checking on random inputs" in capsys.readouterr().err
    check = json.loads((tmp_path / "out" / "model.onnx.json").read_text())["check"]
    assert check["inputs"] == "random normal inputs (no real images)" and check["passed"]


def test_given_images_are_decoded_and_one_bad_file_is_skipped(run, tmp_path):
    cfg = load_config(run / "config.yaml")
    images = sorted((helpers.Path(cfg.data.root) / "val").rglob("*.JPEG"))[:3]
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(b"not an image")
    assert export_command(args(run, output=str(tmp_path / "out"), images=[*map(str, images), str(bad)])) == 0
    check = json.loads((tmp_path / "out" / "model.onnx.json").read_text())["check"]
    assert check["images"] == 3 and check["inputs"] == "given images (4 found, 1 undecodable)"


def test_missing_runtime_is_one_line_naming_the_extra(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(DependencyError, match=r"needs onnxruntime: pip install 'mlu-imagenet-trainer\[export\]'"):
        export_command(args(run, output=str(tmp_path)))


def test_auto_exporter_is_torchs_own_default():
    import inspect

    dynamo = inspect.signature(torch.onnx.export).parameters.get("dynamo")
    assert onnx_exporter("auto") == ("dynamo" if dynamo is not None and dynamo.default is True else "torchscript")
    assert onnx_exporter("torchscript") == "torchscript"


@pytest.mark.slow
def test_cli_export_prints_the_check(run, tmp_path):
    import subprocess

    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "trainer", "export", str(run), "--to", "onnx", "torchscript", "--output", str(out)]
    cmd += ["--samples", "4"]
    cmd += ["--exporter", "dynamo"] if importlib.util.find_spec("onnxscript") else []
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=helpers.REPO)
    assert done.returncode == 0, done.stderr
    assert "PassManager" not in done.stderr and "unused nodes" not in done.stderr  # the dynamo exporter's chatter
    assert done.stdout.count("largest logit difference") == 2
    assert (out / "model.onnx").is_file() and (out / "model.pt").is_file()


def test_a_runs_model_folder_is_checked_on_the_runs_val_split(run, tmp_path):
    """RUN/model/ (what a run writes now) knows its data through the run's config.yaml beside it."""
    from trainer.model_folder import data_config, load_model_folder, write_model_folder

    model, config = load_model_folder(run)
    folder = write_model_folder(model, run / "model", classes=config["label_names"], input_config=data_config(config))
    try:
        assert export_command(args(folder, output=str(tmp_path))) == 0
    finally:
        shutil.rmtree(folder)  # the module's run stays a run from before model folders
    check = json.loads((tmp_path / "model.onnx.json").read_text())["check"]
    assert check["inputs"].startswith("val images of the run's data") and check["passed"]
