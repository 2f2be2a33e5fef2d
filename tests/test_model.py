"""Tests for trainer.model and trainer.pretrained: timm names, and weights only from local files (exported by us)."""

from __future__ import annotations

import pytest
import timm
import torch

from trainer.checkpoint import export_weights
from trainer.config import ModelConfig
from trainer.model import ModelError, create_model

NAME = "test_resnet"  # timm's tiny ResNet: the same code path as resnet50, a few K parameters


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: str = "") -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if skip and key.startswith(skip):
            continue
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 3-class test_resnet with non-default weights (BN statistics too), and its exported file."""
    torch.manual_seed(1)
    model = timm.create_model(NAME, num_classes=3)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.1)
    model.eval()
    path = export_weights(model, tmp_path_factory.mktemp("weights") / "model.safetensors")
    return model, path


def test_builds_any_timm_model_with_the_requested_head():
    model = create_model(ModelConfig(name=NAME, drop_rate=0.2), num_classes=7)
    assert model.get_classifier().out_features == 7
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_drop_path_rate_reaches_the_model():
    model = create_model(ModelConfig(name=NAME, drop_path_rate=0.1), num_classes=2)
    assert any(type(m).__name__ == "DropPath" for m in model.modules())
    plain = create_model(ModelConfig(name=NAME), num_classes=2)
    assert not any(type(m).__name__ == "DropPath" for m in plain.modules())


def test_unknown_name_is_a_model_error_naming_it():
    with pytest.raises(ModelError) as err:
        create_model(ModelConfig(name="resnet5o"), num_classes=3)
    message = str(err.value)
    assert "model.name" in message and "'resnet5o'" in message
    assert "similar:" in message and "resnet50" in message  # a close name is suggested


def test_pretrained_file_loads_exported_weights_exactly(exported):
    model, path = exported
    loaded = create_model(ModelConfig(name=NAME, pretrained=str(path)), num_classes=3)
    assert_same_weights(model, loaded)  # the classifier included
    loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_pretrained_file_in_torch_format_loads_exactly(exported, tmp_path):
    model, _ = exported
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    assert_same_weights(model, create_model(ModelConfig(name=NAME, pretrained=str(path)), num_classes=3))


def test_pretrained_training_checkpoint_with_ddp_prefix_loads_exactly(exported, tmp_path):
    """A torch checkpoint of a DistributedDataParallel model: {'state_dict': {'module.<key>': ...}}."""
    model, _ = exported
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    assert_same_weights(model, create_model(ModelConfig(name=NAME, pretrained=str(path)), num_classes=3))


def test_pretrained_file_with_another_head_keeps_the_backbone(exported):
    model, path = exported
    loaded = create_model(ModelConfig(name=NAME, pretrained=str(path)), num_classes=5)
    assert loaded.get_classifier().out_features == 5
    backbone = {k: v for k, v in loaded.state_dict().items() if not k.startswith("fc.")}
    for key, value in backbone.items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_missing_pretrained_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match=r"model\.pretrained: .*nope\.safetensors does not exist"):
        create_model(ModelConfig(name=NAME, pretrained=str(tmp_path / "nope.safetensors")), num_classes=3)


def test_unusable_pretrained_file_is_a_model_error_naming_it(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    with pytest.raises(ModelError, match="garbage.safetensors"):
        create_model(ModelConfig(name=NAME, pretrained=str(garbage)), num_classes=3)
    other = export_weights(timm.create_model("test_vit", num_classes=3), tmp_path / "vit.safetensors")
    with pytest.raises(ModelError, match=rf"vit\.safetensors does not fit {NAME}"):
        create_model(ModelConfig(name=NAME, pretrained=str(other)), num_classes=3)


def test_exported_file_is_plain_timm_weights(exported):
    """Anyone with timm alone can use the export: no trainer code on the loading side."""
    model, path = exported
    plain = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=3)
    # timm keeps the file's classifier only when told the file's head size; the backbone always loads.
    assert_same_weights(model, plain, skip="fc.")
    with_head = timm.create_model(
        NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=3), num_classes=3
    )
    assert_same_weights(model, with_head)
