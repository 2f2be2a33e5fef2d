"""End to end through the real CLI: folder -> tar shards -> training, random and streamed, on 2 processes,
and exact resume."""

from __future__ import annotations

import pytest
from test_cli_e2e import assert_same_weights, read_metrics, run_cli, tiny_config, two_process_launcher

import helpers

pytestmark = pytest.mark.slow


def converted(tmp_path, train_per_class: int = 8, shard_size: int = 4):
    """A folder converted to shards by `trainer convert`; returns the shards' directory."""
    root = helpers.make_image_folder(tmp_path / "imagenet", train_per_class=train_per_class)
    config = tiny_config(tmp_path, {"root": str(root)})
    run_cli("convert", "--config", str(config), "--to", "wds", str(tmp_path / "wds"), "--shard-size", str(shard_size))
    return tmp_path / "wds"


@pytest.mark.parametrize("streaming", [False, True])
def test_convert_then_train_from_shards_on_2_processes_sees_every_sample(tmp_path, streaming):
    # 3 classes x 8 = 24 train images = 3 steps x 2 processes x 4; 9 val images.
    shards = converted(tmp_path)
    config = tiny_config(tmp_path, {"source": "wds", "root": str(shards), "streaming": streaming}, train={"epochs": 1})
    run_cli("train", "--config", str(config), launcher=two_process_launcher(), timeout=240)
    (record,) = read_metrics(tmp_path / "runs" / "tiny")
    assert record["step"] == 3 and record["train_samples"] == 24 and record["skipped"] == 0
    assert record["val_samples"] == 9


def test_resume_mid_epoch_from_shards_matches_uninterrupted_run_bit_for_bit(tmp_path):
    shards = converted(tmp_path, train_per_class=6)
    config = tiny_config(
        tmp_path,
        {"source": "wds", "root": str(shards)},
        train={"checkpoint_every_steps": 3, "keep_last_checkpoints": 100},
    )
    run_cli("train", "--config", str(config))
    full = tmp_path / "runs" / "tiny"
    for step in (3, 6):  # inside epoch 1 and inside epoch 2
        name = f"resumed_{step}"
        run_cli(
            "train",
            "--config",
            str(config),
            f"output.run_name={name}",
            f"train.resume={full / 'checkpoints' / f'step_{step:08d}'}",
            "loader.workers=2",
        )
        assert_same_weights(full / "model.safetensors", tmp_path / "runs" / name / "model.safetensors")
