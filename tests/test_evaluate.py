"""Tests for trainer.evaluate: exact sums over the val split, and `trainer eval` without a training setup."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from trainer.backend import create_accelerator
from trainer.checkpoint import export_weights
from trainer.config import ModelConfig, load_config
from trainer.errors import ConfigError
from trainer.evaluate import eval_command, evaluate
from trainer.model import create_model


class Constant(torch.nn.Module):
    """Always predicts class 0 (and class 1 second)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[2.0, 1.0, 0.0]]).expand(images.shape[0], 3)


def test_evaluate_sums_every_image_and_counts_skips():
    acc, _ = create_accelerator("cpu", "fp32")
    batches = [
        {"images": torch.zeros(2, 3, 4, 4), "labels": torch.tensor([0, 1]), "skipped": []},
        {"images": torch.empty(0), "labels": torch.empty(0, dtype=torch.int64), "skipped": ["a.JPEG\tbroken"]},
        {"images": torch.zeros(1, 3, 4, 4), "labels": torch.tensor([2]), "skipped": []},
    ]
    skipped = []
    result = evaluate(
        acc,
        Constant(),
        batches,
        lambda x: x,
        lambda lines: skipped.extend(lines) or len(lines),
        num_classes_for_confusion=3,
    )
    assert result["val_samples"] == 3 and result["val_skipped"] == 1 and skipped == ["a.JPEG\tbroken"]
    assert result["val_top1"] == pytest.approx(1 / 3) and result["val_top5"] == 1.0
    assert result["confusion"][:, 0].tolist() == [1, 1, 1]


def test_a_stop_leaves_validation_at_the_next_batch_and_says_so():
    acc, _ = create_accelerator("cpu", "fp32")
    batch = {"images": torch.zeros(2, 3, 4, 4), "labels": torch.tensor([0, 1]), "skipped": []}
    asked = []
    result = evaluate(
        acc, Constant(), [batch] * 3, lambda x: x, len, stop_requested=lambda: len(asked.append(0) or asked) > 1
    )
    assert result["stopped"] == 1 and result["val_samples"] == 2  # one batch, then the stop
    assert evaluate(acc, Constant(), [batch] * 3, lambda x: x, len, stop_requested=lambda: False)["stopped"] == 0
    assert "stopped" not in evaluate(acc, Constant(), [batch], lambda x: x, len)  # `trainer eval` has no stop


def test_eval_command_loads_weights_and_says_where_it_wrote(tmp_path, image_folder, capsys):
    model = create_model(ModelConfig(name="test_resnet"), 3)
    weights = export_weights(model, tmp_path / "model.safetensors")
    cfg = load_config(
        None,
        [
            f"data.root={image_folder}",
            "model.name=test_resnet",
            "input.img_size=16",
            "loader.workers=0",
            "train.precision=fp32",
            f"output.dir={tmp_path / 'runs'}",
        ],
    )
    result = eval_command(cfg, str(weights), str(tmp_path / "out"), confusion=True)  # logs to stderr, as the CLI does
    assert result["val_samples"] == 9
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert written["checkpoint"] == str(weights) and written["val_top1"] == result["val_top1"]
    err = capsys.readouterr().err
    assert f"wrote {tmp_path / 'out' / 'eval.json'}" in err and "confusion.png" in err
    assert (tmp_path / "out" / "per_class.csv").is_file()


@pytest.mark.parametrize("kind", ["five classes", "not a weights file"])
def test_eval_of_weights_that_do_not_fit_is_one_line(tmp_path, image_folder, kind):
    weights = tmp_path / "weights.safetensors"
    if kind == "five classes":
        export_weights(timm.create_model("test_resnet", num_classes=5), weights)
    else:
        weights.write_bytes(b"not a weights file")
    cfg = load_config(
        None, [f"data.root={image_folder}", "model.name=test_resnet", "loader.workers=0", "train.precision=fp32"]
    )
    with pytest.raises(ConfigError, match=r"cannot be loaded into test_resnet with 3 classes") as err:
        eval_command(cfg, str(weights), str(tmp_path / "out"), confusion=False)
    assert "\n" not in str(err.value) and str(weights) in str(err.value)
    assert ("size mismatch" in str(err.value)) == (kind == "five classes")
