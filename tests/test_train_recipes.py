"""The modern-recipe features inside the trainer: exact mid-epoch resume with all of them on,
gradient clipping at the accumulation boundary, EMA validation, export and `trainer eval --ema`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import helpers
from trainer.config import load_config
from trainer.metrics import read_metrics
from trainer.train import Trainer

REPO = Path(__file__).resolve().parent.parent

ALL_ON = {
    # batch 3: odd, so mixup takes its odd-batch path
    "loader": {"batch_size_per_device": 3, "workers": 0},
    "input": {"img_size": 32, "test_img_size": 40},
    "aug": {"re_prob": 0.5, "repeated_aug": 3, "auto_augment": "rand-m6-mstd0.5-inc1"},
    "optim": {"name": "lamb", "lr": 0.01, "weight_decay": 0.02, "no_decay_norm_bias": True},
    "schedule": {"name": "cosine", "warmup_epochs": 0.5},
    "train": {
        "epochs": 2,
        "precision": "fp32",
        "log_every_steps": 1,
        "grad_accum_steps": 2,
        "loss": "bce",
        "bce_target_threshold": 0.2,
        "grad_clip_norm": 0.5,
        "checkpoint_every_steps": 2,
        "keep_last_checkpoints": 100,
    },
    "mixup": {"mixup_alpha": 0.1, "cutmix_alpha": 1.0},
    "ema": {"enabled": True, "decay": 0.8, "warmup": True},
}


def write_config(tmp_path: Path, root: Path, **sections: dict) -> Path:
    cfg = {"model": {"name": "test_resnet"}, "output": {"dir": str(tmp_path / "runs"), "plots": False}}
    for name in {*ALL_ON, *sections}:  # each section: ALL_ON's keys, then the test's
        cfg[name] = {**cfg.get(name, {}), **ALL_ON.get(name, {}), **sections.get(name, {})}
    cfg.setdefault("data", {})["root"] = str(root)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(config: Path, *overrides: str) -> dict:
    trainer = Trainer(load_config(config, list(overrides)))
    try:
        return trainer.fit()
    finally:
        trainer.close()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return helpers.make_image_folder(tmp_path / "imagenet", train_per_class=7)


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_resume_mid_epoch_with_every_feature_on_is_bit_exact(tmp_path, data):
    config = write_config(tmp_path, data)
    full_record = fit(config)
    full = tmp_path / "runs" / "tiny"
    assert {"val_top1_ema", "val_loss_ema", "val_top5_ema", "grad_norm"} <= full_record.keys()
    checkpoints = sorted((full / "checkpoints").glob("step_*"))
    assert all((c / "model_ema.safetensors").is_file() for c in checkpoints)
    # 21 images x 3 repeats, 21 per epoch: 7 batches of 3 -> 4 steps of up to 2 micro-batches; steps 2 and 6 are
    # mid-epoch.
    for step in (2, 6):
        name = f"resumed_{step}"
        # NOTE: two loader workers on the second resume, none before: nothing is keyed by worker.
        workers = "loader.workers=2" if step == 6 else "loader.workers=0"
        record = fit(
            config, f"output.run_name={name}", f"train.resume={full / 'checkpoints' / f'step_{step:08d}'}", workers
        )
        for weights in ("model.safetensors", "model_ema.safetensors"):
            assert same_tensors(full / weights, tmp_path / "runs" / name / weights), (step, weights)
        assert record["val_top1_ema"] == full_record["val_top1_ema"] and record["val_loss"] == full_record["val_loss"]
        # the resumed epoch's train figures are the whole epoch's, as in the uninterrupted run
        train = ("train_loss", "train_top1", "train_samples", "skipped", "grad_norm")
        resumed_epochs = {r["epoch"]: {k: r[k] for k in train} for r in read_metrics(tmp_path / "runs" / name)}
        assert resumed_epochs == {
            r["epoch"]: {k: r[k] for k in train} for r in read_metrics(full) if r["epoch"] in resumed_epochs
        }, step


def test_clipping_bounds_the_update_at_the_accumulation_boundary(tmp_path, data):
    config = write_config(
        tmp_path,
        data,
        optim={"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
        train={"grad_clip_norm": 1e-3, "max_steps_per_epoch": 1},
        mixup={"mixup_alpha": 0.0, "cutmix_alpha": 0.0},
        ema={"enabled": False},
        schedule={"name": "constant", "warmup_epochs": 0.0},
    )
    trainer = Trainer(load_config(config))
    trainer.run.prepare()  # the log point writes steps.jsonl into the run directory
    try:
        before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
        record = trainer.train_epoch(0)
        after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    finally:
        trainer.close()
    assert trainer.state.global_step == 1 and trainer.state.batches_done == 2  # one update from two micro-batches
    assert record["grad_norm"] > 1e-3  # logged before clipping
    assert (after - before).norm().item() == pytest.approx(0.1 * 1e-3, rel=1e-3)  # lr x clipped norm


@pytest.mark.slow
def test_eval_takes_the_raw_or_the_ema_weights(tmp_path, data):
    config = write_config(tmp_path, data, train={"epochs": 1}, aug={"repeated_aug": 0})
    record = fit(config)
    run = tmp_path / "runs" / "tiny"
    results = {}
    for extra in ([], ["--ema"]):
        out = tmp_path / f"eval{len(extra)}"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "trainer",
                "eval",
                "--config",
                str(config),
                "--checkpoint",
                str(run),
                "--output",
                str(out),
                "--no-confusion",
                *extra,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[bool(extra)] = json.loads((out / "eval.json").read_text())
    assert results[False]["checkpoint"].endswith("model.safetensors") and results[True]["checkpoint"].endswith(
        "model_ema.safetensors"
    )
    assert math.isclose(results[False]["val_top1"], record["val_top1"]) and math.isclose(
        results[True]["val_top1"], record["val_top1_ema"]
    )
    assert math.isclose(results[True]["val_loss"], record["val_loss_ema"], rel_tol=1e-6)
