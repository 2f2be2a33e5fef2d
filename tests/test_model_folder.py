"""trainer.model_folder, trainer.run_model, trainer.labels: a run's model as a timm / HF model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from test_train import fit, tiny_config

from trainer.__main__ import main
from trainer.errors import ModelError
from trainer.labels import label_descriptions
from trainer.model_folder import data_config, load_model_folder, resolve_model

TIMM_LOCAL_DIR = tuple(int(v) for v in timm.__version__.split(".")[:3] if v.isdigit()) >= (1, 0, 16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One epoch of test_resnet on 3 classes at 16 px with an EMA; the trainer kept for its models."""
    tmp = tmp_path_factory.mktemp("model_folder")
    overrides = ("output.run_name=r", "train.epochs=1", "ema.enabled=true", "ema.decay=0.5")
    overrides += ("input.crop_pct=0.875", "input.interpolation=bicubic")
    trainer, _ = fit(tiny_config(tmp, *overrides))
    return trainer, tmp / "runs" / "r"


def logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Eval logits in channels_last, as the trainer's model (train.channels_last): the same kernels, equal bits."""
    with torch.no_grad():
        return model.eval().to(memory_format=torch.channels_last)(images)


def test_the_run_writes_model_folders_in_timms_hub_format(trained):
    trainer, run = trained
    for name in ("model", "model_ema"):
        assert sorted(p.name for p in (run / name).iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 3
    assert config["label_names"] == ["n00000000", "n00000001", "n00000002"] == trainer.data.classes
    pretrained = config["pretrained_cfg"]
    # the input config the run resolved (16 px, its crop and filter), not timm's 160 px defaults
    assert pretrained["input_size"] == [3, 16, 16] and pretrained["crop_pct"] == 0.875
    assert pretrained["interpolation"] == "bicubic"
    assert pretrained["mean"] == list(trainer.data.data_config["mean"]) and pretrained["num_classes"] == 3
    # facts of timm's published weights, not of these
    assert not {"tag", "hf_hub_id", "url", "test_input_size", "pool_size"} & set(pretrained)
    assert (run / "model.safetensors").samefile(run / "model" / "model.safetensors")
    assert (run / "model_ema.safetensors").samefile(run / "model_ema" / "model.safetensors")
    card = (run / "model" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card
    val_top1 = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_top1"]
    assert f"| final | 1 | {val_top1:.4f} |" in card and str(run / "plots") in card
    assert f"trainer train --config {run / 'config.yaml'}" in card
    ema_card = (run / "model_ema" / "README.md").read_text()
    ema_top1 = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_top1_ema"]
    assert f"| final | 1 | {ema_top1:.4f} |" in ema_card


@pytest.mark.skipif(not TIMM_LOCAL_DIR, reason=f"timm {timm.__version__} has no local-dir: loading (1.0.16 and later)")
def test_timm_loads_the_folder_with_nothing_else_typed_and_gives_the_trainers_logits(trained):
    trainer, run = trained
    images = torch.randn(4, 3, 16, 16)
    raw = trainer.accelerator.unwrap_model(trainer.model)
    for name, reference in (("model", raw), ("model_ema", trainer.ema.module)):
        loaded = timm.create_model(f"local-dir:{run / name}", pretrained=True)
        assert torch.equal(logits(loaded, images), logits(reference, images)), name
    assert not torch.equal(logits(raw, images), logits(trainer.ema.module, images))  # two different sets of weights
    resolved = timm.data.resolve_data_config({}, model=loaded)
    assert (resolved["input_size"], resolved["crop_pct"], resolved["interpolation"]) == ((3, 16, 16), 0.875, "bicubic")


def test_load_model_folder_takes_a_folder_a_run_or_a_checkpoint(trained):
    trainer, run = trained
    images = torch.randn(2, 3, 16, 16)
    raw = logits(trainer.accelerator.unwrap_model(trainer.model), images)
    checkpoint = next((run / "checkpoints").iterdir())
    for path, ema in ((run / "model", False), (run, False), (checkpoint, False), (run, True), (checkpoint, True)):
        model, config = load_model_folder(path, ema=ema)
        expected = logits(trainer.ema.module, images) if ema else raw
        assert torch.equal(logits(model, images), expected), (path, ema)
        assert config["label_names"] == trainer.data.classes and data_config(config)["input_size"] == (3, 16, 16)


def test_model_folder_command_writes_the_folders_of_an_earlier_run(trained, tmp_path: Path):
    _, run = trained
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("model", "model_ema"))
    (old / "model.safetensors").unlink()  # an independent copy, as an earlier run wrote it
    shutil.copy(run / "model" / "model.safetensors", old / "model.safetensors")
    # without a folder the run is still read, from config.yaml
    assert resolve_model(old).config == json.loads((run / "model" / "config.json").read_text())
    assert main(["model-folder", str(old)]) == 0
    for name in ("model", "model_ema"):
        config = json.loads((old / name / "config.json").read_text())
        assert config == json.loads((run / name / "config.json").read_text())
        assert (old / name / "model.safetensors").read_bytes() == (run / name / "model.safetensors").read_bytes()


def test_unfinished_run_takes_a_checkpoint_and_stays_unfinished(trained, tmp_path: Path):
    _, run = trained
    unfinished = tmp_path / "unfinished"
    final = {"model", "model_ema", "model.safetensors", "model_ema.safetensors"}
    shutil.copytree(run, unfinished, ignore=lambda folder, names: final & set(names) if Path(folder) == run else set())
    assert main(["model-folder", str(unfinished)]) == 2  # one line: give --checkpoint
    checkpoint = next((unfinished / "checkpoints").iterdir())
    assert main(["model-folder", str(unfinished), "--checkpoint", str(checkpoint)]) == 0
    assert (unfinished / "model" / "config.json").is_file() and not (unfinished / "model.safetensors").exists()


@pytest.mark.parametrize(
    "make, ema, message",
    [
        (lambda tmp: tmp / "absent", False, "no such model folder, run directory or checkpoint"),
        (lambda tmp: tmp, False, "neither a model folder"),
        (lambda tmp: tmp / "model", True, "is a model folder, one set of weights"),
    ],
)
def test_bad_model_paths_are_one_line(trained, tmp_path: Path, make, ema: bool, message: str):
    shutil.copytree(trained[1] / "model", tmp_path / "model")
    with pytest.raises(ModelError, match=message):
        resolve_model(make(tmp_path), ema=ema)


def test_weights_of_another_model_are_one_line(trained, tmp_path: Path):
    folder = tmp_path / "model"
    shutil.copytree(trained[1] / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_classes": 5}))
    with pytest.raises(ModelError, match=r"model.safetensors: does not fit ResNet with 5 classes: .*fc"):
        load_model_folder(folder)


def test_imagenet_synsets_are_described_other_names_kept():
    described = label_descriptions(["n01440764", "n02102040", "digit_3", "n99999999"])
    assert described == {"n01440764": "tench, Tinca tinca", "n02102040": "English springer, English springer spaniel"}
    assert label_descriptions(["cat", "dog"]) == {}


def test_without_timms_imagenet_metadata_names_stay_undescribed(monkeypatch):
    import sys

    from trainer import labels

    labels._imagenet_lemmas.cache_clear()
    monkeypatch.setitem(sys.modules, "timm.data", None)  # as a timm without ImageNetInfo: the import fails
    try:
        assert label_descriptions(["n01440764"]) == {}
    finally:
        labels._imagenet_lemmas.cache_clear()


def test_a_separate_val_size_becomes_timms_test_input_size():
    from trainer.model_folder import hub_config

    model = timm.create_model("test_resnet", num_classes=2)
    train = {"input_size": (3, 160, 160), "interpolation": "bicubic", "crop_pct": 0.95}
    train.update(mean=(0.5,) * 3, std=(0.5,) * 3)
    config = hub_config(model, classes=["a", "b"], input_config=train, test_size=224)  # RSB A3: train 160, test 224
    pretrained = config["pretrained_cfg"]
    assert pretrained["input_size"] == [3, 160, 160] and pretrained["test_input_size"] == [3, 224, 224]
    assert data_config(config)["input_size"] == (3, 224, 224)  # what predict and timm's validate.py use
    assert "test_input_size" not in model.pretrained_cfg  # the model's own pretrained_cfg is put back


def test_ema_of_a_run_without_one_is_one_line(trained, tmp_path: Path):
    run = tmp_path / "no_ema"
    shutil.copytree(trained[1], run, ignore=lambda folder, names: {"model_ema", "model_ema.safetensors"} & set(names))
    with pytest.raises(ModelError, match=r"model_ema.safetensors: not found \(the run had ema.enabled off\)"):
        resolve_model(run, ema=True)
