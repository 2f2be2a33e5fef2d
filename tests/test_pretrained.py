"""Tests for trainer.pretrained through create_model: model folders, run directories, cached hub ids, the old key."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

import pytest
import timm
import torch
from test_train import fit, tiny_config

import helpers
from trainer.checkpoint import STATE_FILE, TrainState, export_weights
from trainer.config import ConfigError, ModelConfig, load_config, save_config
from trainer.model import ModelError, create_model
from trainer.pretrained import resolve_pretrained
from trainer.train import Trainer

NAME = "test_resnet"


def trained(num_classes: int) -> torch.nn.Module:
    """A test_resnet whose weights differ from any fresh one (so loading is visible)."""
    torch.manual_seed(3)
    model = timm.create_model(NAME, num_classes=num_classes)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.1)
    return model.eval()


def same_backbone(a: torch.nn.Module, b: torch.nn.Module, head: bool = True) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if head or not k.startswith("fc."))


@pytest.fixture
def model_folder(tmp_path):
    """A 3-class model folder written by timm's own writer (config.json + model.safetensors)."""
    model = trained(3)
    folder = tmp_path / "folder"
    timm.models.save_for_hf(model, str(folder), model_config={"label_names": ["a", "b", "c"]}, safe_serialization=True)
    return model, folder


@pytest.mark.parametrize("prefix", ["", "local-dir:"])
def test_model_folder_loads_exactly_by_path_or_local_dir(model_folder, prefix):
    model, folder = model_folder
    loaded = create_model(ModelConfig(name=NAME, pretrained=f"{prefix}{folder}"), num_classes=3)
    assert same_backbone(model, loaded)
    source = resolve_pretrained(f"{prefix}{folder}")
    assert source.architecture == NAME and source.label_names == ("a", "b", "c")


def test_other_head_size_is_reinitialised_with_one_line_naming_it(model_folder, caplog):
    model, folder = model_folder
    with caplog.at_level(logging.INFO, logger="trainer"):
        loaded = create_model(ModelConfig(name=NAME, pretrained=str(folder)), num_classes=5)
    assert loaded.get_classifier().out_features == 5 and same_backbone(model, loaded, head=False)
    lines = [r.getMessage() for r in caplog.records if "re-initialised" in r.getMessage()]
    assert len(lines) == 1 and str(folder) in lines[0]
    assert "3-class head" in lines[0] and "fc re-initialised for 5 classes" in lines[0]


def test_folder_of_another_architecture_is_a_model_error_naming_both(model_folder):
    _, folder = model_folder
    with pytest.raises(ModelError, match=rf"holds a {NAME}, not model.name resnet18; set model.name={NAME}"):
        create_model(ModelConfig(name="resnet18", pretrained=str(folder)), num_classes=3)


def test_run_directory_and_its_checkpoint_load(tmp_path):
    """A run from before model folders (config.yaml + model.safetensors) and a checkpoint of it."""
    model = trained(4)
    run, checkpoint = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_00000010"
    checkpoint.mkdir(parents=True)
    root = helpers.make_image_folder(tmp_path / "data", classes=4, train_per_class=1, val_per_class=1)
    save_config(load_config(None, [f"data.root={root}", f"model.name={NAME}"]), run / "config.yaml")
    (checkpoint / STATE_FILE).write_text(json.dumps(asdict(TrainState())))
    export_weights(model, run / "model.safetensors")
    export_weights(model, checkpoint / "model.safetensors")
    for spec in (run, checkpoint):
        assert resolve_pretrained(str(spec)).architecture == NAME
        assert same_backbone(model, create_model(ModelConfig(name=NAME, pretrained=str(spec)), num_classes=4))
    with pytest.raises(ModelError, match="not model.name resnet18"):
        create_model(ModelConfig(name="resnet18", pretrained=str(run)), num_classes=4)


def test_folder_without_weights_is_a_model_error(model_folder, tmp_path):
    _, folder = model_folder
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"model\.pretrained: .* holds no model\.safetensors or pytorch_model\.bin"):
        create_model(ModelConfig(name=NAME, pretrained=str(folder)), num_classes=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"model\.pretrained: .*: neither a model folder"):
        create_model(ModelConfig(name=NAME, pretrained=str(tmp_path / "empty")), num_classes=3)


def write_hub_cache(cache, repo_id: str, folder) -> None:
    """The layout huggingface_hub's cache has: refs/main names a snapshot holding the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((folder / name).read_bytes())


@pytest.mark.parametrize("spec", ["hf-hub:someone/tiny-resnet", "someone/tiny-resnet"])
def test_cached_hub_id_loads_from_the_cache(model_folder, tmp_path, monkeypatch, spec):
    import huggingface_hub.constants

    model, folder = model_folder
    write_hub_cache(tmp_path / "hub", "someone/tiny-resnet", folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = create_model(ModelConfig(name=NAME, pretrained=spec), num_classes=3)
    assert same_backbone(model, loaded)


def test_uncached_hub_id_is_one_line_and_downloads_nothing(tmp_path, monkeypatch):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with pytest.raises(ModelError) as err:
        resolve_pretrained("timm/resnet50.a1_in1k", cache_dir=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "nothing is downloaded" in message
    assert "'timm/resnet50.a1_in1k' is not in the local hub cache" in message


def test_missing_path_that_is_no_hub_id_says_it_does_not_exist(tmp_path):
    with pytest.raises(ModelError, match=r"model\.pretrained: .*/a/b/c does not exist"):
        resolve_pretrained(str(tmp_path / "a" / "b" / "c"))


def test_bad_config_json_is_a_model_error_naming_it(model_folder):
    _, folder = model_folder
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"model\.pretrained: .*config\.json: unreadable"):
        resolve_pretrained(str(folder))


def test_deprecated_pretrained_file_maps_to_pretrained_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="trainer"):
        cfg = load_config(None, ["data.root=/x", "model.pretrained_file=/w.safetensors"])
    assert (cfg.model.pretrained, cfg.model.pretrained_file) == ("/w.safetensors", "")
    assert any("model.pretrained_file is deprecated" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="deprecated alias of model.pretrained; set only that"):
        load_config(None, ["data.root=/x", "model.pretrained_file=/w.safetensors", "model.pretrained=/v"])


def test_a_run_fine_tunes_from_another_runs_folder_with_layer_decay(tmp_path):
    """Trained on 3 classes, fine-tuned on 2: backbone from the first run's model/ folder, new head, decayed lrs."""
    first, _ = fit(tiny_config(tmp_path, "output.run_name=first", "train.epochs=1"))
    source = tmp_path / "runs" / "first"
    other = helpers.make_image_folder(tmp_path / "two", classes=2)
    overrides = [f"data.root={other}", f"model.pretrained={source}", "optim.layer_decay=0.5", "train.epochs=1"]
    cfg = tiny_config(tmp_path, *overrides, "output.run_name=second")
    trainer = Trainer(cfg)
    try:
        model = trainer.accelerator.unwrap_model(trainer.model)
        trained = first.accelerator.unwrap_model(first.model).state_dict()
        assert model.get_classifier().out_features == 2
        assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items() if not k.startswith("fc."))
        lrs = sorted({group["lr"] for group in trainer.optimizer.param_groups})
        assert len(lrs) > 2 and lrs[-1] == pytest.approx(cfg.optim.lr) and trainer.boundary.lr == pytest.approx(lrs[-1])
        record = trainer.fit()
    finally:
        trainer.close()
    assert record["val_samples"] == 6 and record["lr"] == pytest.approx(cfg.optim.lr)


@pytest.mark.slow
def test_cli_train_says_which_head_it_reinitialised(model_folder, tmp_path):
    """The line is logged while the Trainer is built: the CLI must show it (logging is set up before)."""
    import subprocess
    import sys

    _, folder = model_folder
    root = helpers.make_image_folder(tmp_path / "data", classes=2)
    overrides = [f"model.name={NAME}", f"model.pretrained={folder}", f"data.root={root}", "data.create_if_missing="]
    overrides += ["input.img_size=16", "loader.workers=0", "loader.batch_size_per_device=4", "train.epochs=1"]
    overrides += ["train.max_steps_per_epoch=1"]
    overrides += ["train.precision=fp32", f"output.dir={tmp_path / 'runs'}", "output.plots=false"]
    cmd = [sys.executable, "-m", "trainer", "train", *overrides, "output.progress=log"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=helpers.REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "re-initialised" in line]
    assert len(lines) == 1 and f"{folder} has a 3-class head; fc re-initialised for 2 classes" in lines[0]
    assert "Loading pretrained weights" not in done.stderr  # timm's own lines are kept quiet
