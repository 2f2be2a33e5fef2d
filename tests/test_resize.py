"""Tests for trainer.data.resize: the train-size schedule, the loader rebuilt when the size
changes (persistent workers included), and a run resumed mid-epoch across a change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import helpers
from trainer.backend import create_accelerator
from trainer.config import Config, ConfigError, DataConfig, InputConfig, LoaderConfig, ModelConfig, load_config
from trainer.data.resize import describe_schedule, schedule_problem, train_size_at
from trainer.train import Trainer


def test_each_epoch_takes_the_last_entry_at_or_before_it():
    schedule = [[0, 160], [12, 192], [20, 224]]
    assert [train_size_at(schedule, e, 99) for e in (0, 11, 12, 19, 20, 50)] == [160, 160, 192, 192, 224, 224]
    assert train_size_at([], 7, 224) == 224  # no schedule: the configured size
    assert describe_schedule(schedule) == "160 px, 192 px from epoch 13, 224 px from epoch 21"


def write_config(path: Path, input: dict) -> Path:
    path.write_text(yaml.safe_dump({"data": {"root": "/nowhere"}, "input": input}))
    return path


def test_the_schedule_reads_from_yaml_and_from_the_command_line(tmp_path):
    cfg = load_config(write_config(tmp_path / "a.yaml", {"train_size_schedule": [[0, 160], [12, 192]]}))
    assert cfg.input.train_size_schedule == [[0, 160], [12, 192]]
    cfg = load_config(write_config(tmp_path / "b.yaml", {}), ["input.train_size_schedule=[[0,128],[3,160]]"])
    assert cfg.input.train_size_schedule == [[0, 128], [3, 160]]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ([[1, 160]], "must start at epoch 0"),
        ([[0, 160], [5, 192], [5, 224]], "epochs must increase"),
        ([[0, 160], [5, 0]], "sizes must be > 0"),
        ([[0, 160, 3]], "[epoch, px] integer pairs"),
        ([[0, 160.5]], "[epoch, px] integer pairs"),
        (["0:160", "12:192"], "[epoch, px] integer pairs"),
    ],
)
def test_an_unusable_schedule_is_a_one_line_error_naming_key_and_value(tmp_path, value, why):
    assert why in schedule_problem(value)
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path / "bad.yaml", {"train_size_schedule": value}))
    message = str(err.value)
    assert (
        "\n" not in message
        and "bad.yaml: input.train_size_schedule" in message
        and why in message
        and repr(value) in message
    )


def test_a_size_change_restarts_persistent_workers_at_the_new_size(image_folder):
    # NOTE: one persistent worker from the fork server: it holds the dataset pickled at 16 px.
    cfg = Config(
        model=ModelConfig(name="test_resnet"),
        data=DataConfig(root=str(image_folder)),
        loader=LoaderConfig(batch_size_per_device=4, workers=1, persistent_workers=True),
        input=InputConfig(img_size=24, train_size_schedule=[[0, 16], [1, 20]]),
    )
    acc, _ = create_accelerator("cpu", "fp32")
    datasets = helpers.create_datasets_for(cfg)
    p = helpers.create_pipeline_for(cfg, datasets, acc, pin_memory=False, channels_last=False)
    sizes, loader = {}, p.train
    for epoch in range(3):
        if epoch == 1:
            old_workers = p.train.base_dataloader._iterator._workers
            assert old_workers and all(w.is_alive() for w in old_workers)  # persistent: still up after epoch 1
        loader = p.resize(epoch, loader)
        if epoch == 1:
            assert loader is not p.train and not any(w.is_alive() for w in old_workers)  # stopped, not left idle
        loader.set_epoch(epoch)
        sizes[epoch] = {tuple(b["images"].shape[-2:]) for b in loader}
    assert sizes == {0: {(16, 16)}, 1: {(20, 20)}, 2: {(20, 20)}}
    assert {tuple(b["images"].shape[-2:]) for b in p.val} == {(24, 24)}  # val keeps img_size


TINY = {
    "model": {"name": "test_resnet"},
    # 18 images, batch 3: 6 micro-batches, 3 steps of 2 an epoch
    "loader": {"batch_size_per_device": 3, "workers": 0},
    "input": {"img_size": 32, "test_img_size": 32, "train_size_schedule": [[0, 24], [1, 32]]},
    "optim": {"lr": 0.05},
    "schedule": {"name": "cosine"},
    "train": {
        "epochs": 2,
        "precision": "fp32",
        "grad_accum_steps": 2,
        "log_every_steps": 1,
        "checkpoint_every_steps": 1,
        "keep_last_checkpoints": 100,
    },
}


@pytest.fixture
def config(tmp_path: Path, image_folder: Path) -> Path:
    cfg = {**TINY, "data": {"root": str(image_folder)}, "output": {"dir": str(tmp_path / "runs"), "plots": False}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit_recording_sizes(config: Path, *overrides: str) -> tuple[dict, list[tuple[int, tuple[int, ...]]]]:
    """The run's last record, and (epoch, image height and width) of every micro-batch it trained on."""
    trainer = Trainer(load_config(config, list(overrides)))
    seen, train_step = [], trainer.train_step

    def recording(batch: dict, sums, *place) -> bool:
        seen.append((trainer.state.epoch, tuple(batch["images"].shape[-2:])))
        return train_step(batch, sums, *place)

    trainer.train_step = recording
    try:
        return trainer.fit(), seen
    finally:
        trainer.close()


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_a_run_trains_at_each_scheduled_size_and_resumes_mid_epoch_bit_exact_across_a_change(tmp_path, config):
    record, seen = fit_recording_sizes(config)
    assert seen == [(0, (24, 24))] * 6 + [(1, (32, 32))] * 6
    full = tmp_path / "runs" / "tiny"
    # step 4 is one step into epoch 2 (at 32 px): the resumed run is built at epoch 1's 24 px
    # and must rebuild at 32 before skipping the two micro-batches already done.
    name = "resumed"
    resumed, seen = fit_recording_sizes(
        config, f"output.run_name={name}", f"train.resume={full / 'checkpoints' / 'step_00000004'}"
    )
    assert seen == [(1, (32, 32))] * 4
    assert same_tensors(full / "model.safetensors", tmp_path / "runs" / name / "model.safetensors")
    assert resumed["val_loss"] == record["val_loss"] and resumed["val_top1"] == record["val_top1"]
