"""End to end through the real CLI: folder and parquet data, exact resume, 2-process exact validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

import helpers

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def tiny_config(tmp_path: Path, data: dict, **sections: dict) -> Path:
    """A seconds-long recipe: timm's test_resnet at 32 px, batch 4, fp32, no workers."""
    cfg = {
        "model": {"name": "test_resnet"},
        "data": data,
        "loader": {"batch_size_per_device": 4, "workers": 0},
        "input": {"img_size": 32},
        "optim": {"lr": 0.05},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
        "train": {"epochs": 2, "precision": "fp32", "log_every_steps": 2},
        "output": {"dir": str(tmp_path / "runs"), "plots": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(
    *args: str, launcher: list[str] | None = None, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable, "-m"]) + ["trainer", *args]
    marker = f"{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRAINER_TEST_RUN": marker}
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            helpers.kill_marked(marker)  # torchrun starts its workers in sessions of their own
            raise
    proc = subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_train_on_image_folder_writes_the_run_directory(tmp_path):
    root = helpers.make_image_folder(tmp_path / "imagenet")
    config = tiny_config(tmp_path, {"root": str(root)})
    run_cli("train", "--config", str(config))
    run_dir = tmp_path / "runs" / "tiny"
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1]
    for key in (
        "epoch",
        "step",
        "train_loss",
        "train_top1",
        "val_loss",
        "val_top1",
        "val_top5",
        "lr",
        "img_per_s",
        "epoch_time_s",
    ):
        assert records[-1][key] is not None, key
    assert records[-1]["step"] == 8 and records[-1]["val_samples"] == 9  # 18 train images // 4 per step, x 2 epochs
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["name"] == "test_resnet" and saved["train"]["epochs"] == 2
    assert (run_dir / "metrics.csv").read_text().count("\n") == 3
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_00000004", "step_00000008"]
    # The exported weights load through timm's own local-file path. NOTE: timm re-initialises
    # the classifier unless the overlay says the file's class count (its default is 1000).
    weights = str(run_dir / "model.safetensors")
    model = timm.create_model(
        "test_resnet", pretrained=True, pretrained_cfg_overlay=dict(file=weights, num_classes=3), num_classes=3
    )
    exported = load_file(weights)
    assert all(torch.equal(value, exported[key]) for key, value in model.state_dict().items())


def test_tensorboard_through_accelerate_log_with(tmp_path):
    root = helpers.make_image_folder(tmp_path / "imagenet")
    config = tiny_config(tmp_path, {"root": str(root)}, train={"epochs": 1}, output={"log_with": ["tensorboard"]})
    run_cli("train", "--config", str(config))
    events = list((tmp_path / "runs" / "tiny").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_train_on_hf_parquet_shards(tmp_path):
    root = helpers.make_hf_parquet(tmp_path / "parquet")
    config = tiny_config(tmp_path, {"source": "hf", "root": str(root)}, train={"epochs": 1})
    run_cli("train", "--config", str(config))
    (record,) = read_metrics(tmp_path / "runs" / "tiny")
    assert record["val_samples"] == 9 and record["train_samples"] == 16


def test_train_on_a_hub_id_from_the_local_hf_cache(tmp_path):
    cache = helpers.make_hf_hub_cache(tmp_path / "hf-cache", "ILSVRC/imagenet-1k")
    data = {"source": "hf", "root": "ILSVRC/imagenet-1k", "hf_cache_dir": str(cache)}
    config = tiny_config(tmp_path, data, train={"epochs": 1})
    run_cli("train", "--config", str(config))
    (record,) = read_metrics(tmp_path / "runs" / "tiny")
    assert record["val_samples"] == 9 and record["train_samples"] == 16
    # The hub is never asked: an id that is not cached is a one-line error, not a download.
    proc = run_cli("train", "--config", str(config), "data.root=ILSVRC/not-cached", check=False)
    assert proc.returncode == 2 and "ILSVRC/not-cached" in proc.stderr and "Traceback" not in proc.stderr


def test_streaming_parquet_trains_sharded(tmp_path):
    root = helpers.make_hf_parquet(tmp_path / "parquet", train_per_class=8)
    data = {"source": "hf", "root": str(root), "streaming": True}
    config = tiny_config(tmp_path, data, train={"epochs": 1, "max_steps_per_epoch": 3})
    run_cli("train", "--config", str(config))
    (record,) = read_metrics(tmp_path / "runs" / "tiny")
    assert record["train_samples"] == 12 and record["val_samples"] == 9


def test_two_processes_stream_uneven_shards_in_step(tmp_path):
    # Two train files of 12 and 4 rows: `datasets` gives each process one whole file, so one
    # process runs out after 2 steps and must step on until the other is done (6 steps);
    # on the CPU processes agree every step whether all have run out, which ends the epoch
    # at step 7 (the first step both have run out) rather than at the 40 steps asked for.
    root = tmp_path / "parquet"
    (root / "data").mkdir(parents=True)
    splits = helpers.make_hf_splits(train_per_class=6)  # 18 train rows; 16 used
    splits["train"].select(range(12)).to_parquet(str(root / "data" / "train-00000-of-00002.parquet"))
    splits["train"].select(range(12, 16)).to_parquet(str(root / "data" / "train-00001-of-00002.parquet"))
    splits["validation"].to_parquet(str(root / "data" / "validation-00000-of-00001.parquet"))
    data = {"source": "hf", "root": str(root), "streaming": True}
    config = tiny_config(
        tmp_path, data, loader={"batch_size_per_device": 2}, train={"epochs": 1, "max_steps_per_epoch": 40}
    )
    proc = run_cli("train", "--config", str(config), launcher=two_process_launcher(), timeout=240)
    (record,) = read_metrics(tmp_path / "runs" / "tiny")
    assert record["step"] == 7 and record["train_samples"] == 16 and record["val_samples"] == 9
    assert "stream shard ran out after 2 of the epoch's 40 batches" in proc.stderr
    assert "every process's stream shard has run out; the epoch ends here" in proc.stderr


def test_resume_mid_epoch_matches_uninterrupted_run_bit_for_bit(tmp_path):
    root = helpers.make_image_folder(tmp_path / "imagenet")
    config = tiny_config(
        tmp_path, {"root": str(root)}, train={"checkpoint_every_steps": 3, "keep_last_checkpoints": 100}
    )
    run_cli("train", "--config", str(config))
    full = tmp_path / "runs" / "tiny"
    # step 3 is inside epoch 1, step 6 inside epoch 2: both resume at an exact batch.
    for step in (3, 6):
        name = f"resumed_{step}"
        # NOTE: two loader workers on resume, none before: augmentation is keyed by sample, not by worker.
        run_cli(
            "train",
            "--config",
            str(config),
            f"output.run_name={name}",
            f"train.resume={full / 'checkpoints' / f'step_{step:08d}'}",
            "loader.workers=2",
        )
        assert_same_weights(full / "model.safetensors", tmp_path / "runs" / name / "model.safetensors")
        assert read_metrics(tmp_path / "runs" / name)[-1]["val_top1"] == read_metrics(full)[-1]["val_top1"]


def test_two_processes_validate_every_image_exactly_once(tmp_path):
    # 3 classes x 3 val images = 9: not divisible by 2 processes, so padding would show.
    root = helpers.make_image_folder(tmp_path / "imagenet", train_per_class=8)
    config = tiny_config(tmp_path, {"root": str(root)}, loader={"val_batch_size_per_device": 2})
    run_cli("train", "--config", str(config), launcher=two_process_launcher())
    run_dir = tmp_path / "runs" / "tiny"
    last = read_metrics(run_dir)[-1]
    assert last["val_samples"] == 9
    proc = run_cli("eval", "--config", str(config), "--checkpoint", str(run_dir / "model.safetensors"))
    single = json.loads(proc.stdout.strip().splitlines()[-1])
    assert single["val_samples"] == 9
    assert single["val_top1"] == pytest.approx(last["val_top1"], abs=1e-9)
    assert single["val_top5"] == pytest.approx(last["val_top5"], abs=1e-9)
    assert single["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert (run_dir / "eval" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (run_dir / "eval" / "per_class.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("class_index,class_name,samples,correct,accuracy")


two_process_launcher = helpers.two_process_launcher


def test_a_batch_skipped_whole_on_one_process_keeps_the_processes_in_step(tmp_path):
    # One image per process per step: the one empty training file leaves one process an
    # empty batch while the other trains; both must still all-reduce and step together.
    root = helpers.make_image_folder(tmp_path / "imagenet", train_per_class=7)  # 21 + 1 empty = 22 = 11 steps x 2
    classes = sorted(p.name for p in (root / "train").iterdir())
    (root / "train" / classes[0] / "empty.JPEG").write_bytes(b"")
    (root / "val" / classes[1] / "empty.JPEG").write_bytes(b"")
    config = tiny_config(
        tmp_path, {"root": str(root)}, loader={"batch_size_per_device": 1}, input={"img_size": 64}, train={"epochs": 1}
    )  # 64 px: BatchNorm needs 2x2 at the end
    # NOTE: processes out of step wait in mismatched collectives until gloo's 30-minute timeout.
    run_cli("train", "--config", str(config), launcher=two_process_launcher(), timeout=240)
    (record,) = read_metrics(tmp_path / "runs" / "tiny")
    assert record["step"] == 11 and record["train_samples"] == 21 and record["skipped"] == 1
    assert record["val_samples"] == 9 and record["val_skipped"] == 1
    listed = sorted(
        line.split("\t")[0] for line in (tmp_path / "runs" / "tiny" / "skipped.txt").read_text().splitlines()
    )
    assert listed == [str(root / "train" / classes[0] / "empty.JPEG"), str(root / "val" / classes[1] / "empty.JPEG")]


def test_eval_of_weights_that_do_not_fit_is_one_line(tmp_path):
    root = helpers.make_image_folder(tmp_path / "imagenet")  # 3 classes
    config = tiny_config(tmp_path, {"root": str(root)}, output={"dir": str(tmp_path / "never-trained")})
    weights = tmp_path / "five_classes.safetensors"  # a file that is not weights: tests/test_evaluate.py, in process
    save_file(timm.create_model("test_resnet", num_classes=5).state_dict(), str(weights))
    proc = run_cli("eval", "--config", str(config), "--checkpoint", str(weights), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (
        lines[-1].startswith(
            f"trainer: error: --checkpoint: {weights} cannot be loaded into test_resnet with 3 classes: "
        )
        and "size mismatch" in lines[-1]
    )


def test_help_lists_options_and_config_sections():
    for command in ("train", "eval", "bench", "check-data"):
        out = run_cli(command, "--help").stdout
        for section in (
            "model.name",
            "data.root",
            "optim.lr",
            "schedule.name",
            "train.epochs",
            "backend.device",
            "output.dir",
        ):
            assert section in out, (command, section)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loader.batch_size_per_device=0", "command line|loader.batch_size_per_device: must be > 0"),
        ("train.epochs=many", "command line: train.epochs: expected int"),
        ("optim.nosuch=1", "command line: unknown key 'optim.nosuch'"),
        ("optim.lr=1e300", "command line: optim.lr: must be > 0 and at most 3.403e+38 (float32), got 1e+300"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, override, expected):
    config = tiny_config(tmp_path, {"root": str(tmp_path)})
    proc = run_cli("train", "--config", str(config), override, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainer: error:"), proc.stderr
    assert any(part in lines[0] for part in expected.split("|"))
    assert str(config) in lines[0] or "command line" in lines[0]


def test_missing_data_root_names_path_and_layout(tmp_path):
    config = tiny_config(tmp_path, {"root": str(tmp_path / "nowhere")})
    proc = run_cli("train", "--config", str(config), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nowhere" in proc.stderr and "ROOT/train/<class>" in proc.stderr
