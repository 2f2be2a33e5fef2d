"""Trainer in process: fit, the files a run writes, and a resume that continues bit for bit."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import helpers
from trainer.config import load_config
from trainer.train import Trainer


def tiny_config(tmp_path: Path, *overrides: str):
    """timm's test_resnet at 16 px on 3 classes x 6 images: 4 steps an epoch, a second or two."""
    data = helpers.make_image_folder(tmp_path / "data") if not (tmp_path / "data").exists() else tmp_path / "data"
    base = [
        "model.name=test_resnet",
        f"data.root={data}",
        "input.img_size=16",
        "loader.batch_size_per_device=4",
        "loader.workers=0",
        "train.precision=fp32",
        "train.epochs=2",
        "train.log_every_steps=2",
        "schedule.name=constant",
        "optim.name=adamw",
        "optim.lr=0.001",
        f"output.dir={tmp_path / 'runs'}",
        "output.plots=false",
        "output.progress=log",
    ]
    return load_config(None, base + list(overrides))


def fit(cfg) -> tuple[Trainer, dict]:
    trainer = Trainer(cfg)
    try:
        return trainer, trainer.fit()
    finally:
        trainer.close()


def test_fit_trains_validates_and_writes_the_run(tmp_path: Path):
    trainer, record = fit(tiny_config(tmp_path, "output.run_name=full"))
    run = tmp_path / "runs" / "full"
    assert record["epoch"] == 1 and record["step"] == 8 == trainer.state.global_step
    assert record["train_samples"] == 16 and record["val_samples"] == 9 and record["skipped"] == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]
    weights = run / "model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == stat.S_IMODE((run / "config.yaml").stat().st_mode)  # not 0600


@pytest.mark.slow
def test_resume_continues_bit_for_bit(tmp_path: Path):
    fit(tiny_config(tmp_path, "output.run_name=full"))
    fit(tiny_config(tmp_path, "output.run_name=half", "train.epochs=1"))
    trainer, record = fit(tiny_config(tmp_path, "output.run_name=half", "train.resume=auto"))
    assert record["step"] == 8
    full, half = (load_file(str(tmp_path / "runs" / name / "model.safetensors")) for name in ("full", "half"))
    assert all(torch.equal(full[k], half[k]) for k in full)
    lines = (tmp_path / "runs" / "half" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def test_grad_accumulation_steps_once_per_window(tmp_path: Path):
    trainer, record = fit(tiny_config(tmp_path, "train.grad_accum_steps=2", "train.epochs=1"))
    assert trainer.steps_per_epoch == 2 and record["step"] == 2 and trainer.state.batches_done == 0


def test_a_global_batch_derives_the_accumulation_on_one_process(tmp_path: Path, caplog):
    caplog.set_level("INFO", logger="trainer")
    trainer, record = fit(tiny_config(tmp_path, "loader.global_batch_size=8", "train.epochs=1"))
    assert trainer.plan.accumulation == 2 and trainer.accelerator.gradient_accumulation_steps == 2
    assert trainer.steps_per_epoch == 2 and record["step"] == 2 and record["train_samples"] == 16
    assert (
        "batch: 4/device x 1 process x 2 accumulation = global 8 (loader.global_batch_size), 2 steps/epoch"
    ) in caplog.text


def test_resumed_with_another_global_batch_the_schedule_ends_where_configured(tmp_path: Path, caplog):
    """Epoch 1 at global batch 8 (2 steps), then global batch 4 (4 steps an epoch): epoch 2 gets the lr of
    a run at 4 throughout."""
    cosine = ["schedule.name=cosine", "schedule.warmup_epochs=0.5", "train.log_every_steps=1"]
    fit(tiny_config(tmp_path, *cosine, "loader.global_batch_size=4", "output.run_name=at4"))
    fit(tiny_config(tmp_path, *cosine, "loader.global_batch_size=8", "train.epochs=1", "output.run_name=moved"))
    caplog.set_level("INFO", logger="trainer")
    trainer, record = fit(
        tiny_config(tmp_path, *cosine, "loader.global_batch_size=4", "train.resume=auto", "output.run_name=moved")
    )
    assert (
        "resumed with global batch 4" in caplog.text
        and ("where the checkpoint had 8 on 1 process: 4 steps per epoch instead of 2") in caplog.text
    )
    assert "resumed from: checkpoint: 1 process, global batch 8; this run: 1 process, global batch 4" in caplog.text
    steps = {
        name: [json.loads(line) for line in (tmp_path / "runs" / name / "steps.jsonl").read_text().splitlines()]
        for name in ("at4", "moved")
    }
    assert [s["step"] for s in steps["moved"]] == [1, 2, 3, 4, 5, 6] and record["train_samples"] == 16
    assert [s["lr"] for s in steps["moved"][2:]] == [s["lr"] for s in steps["at4"][4:]] and steps["moved"][-1][
        "lr"
    ] == 0.0


def test_an_unsafe_or_truncated_checkpoint_is_named_and_the_older_one_resumes(tmp_path: Path, caplog):
    """A checkpoint whose pickles would run a command is refused (the command never runs), the
    next older one resumes bit for bit; when none loads, one error names them all."""
    import pickle
    import shutil

    import pytest
    from accelerate.state import GradientState
    from test_checkpoint_files import Payload

    from trainer.checkpoint import CheckpointError

    fit(tiny_config(tmp_path, "output.run_name=full"))
    cfg = ("output.run_name=cut", "train.checkpoint_every_steps=2", "train.keep_last_checkpoints=10")
    fit(tiny_config(tmp_path, *cfg, "train.epochs=1"))  # step_2 (mid-epoch) and step_4 (epoch end)
    checkpoints, marker = tmp_path / "runs" / "cut" / "checkpoints", tmp_path / "command-ran"
    newest = checkpoints / "step_00000004"
    (newest / "optimizer.bin").write_bytes(pickle.dumps(Payload(marker)))
    torch.save(Payload(marker), newest / "random_states_0.pkl")
    broken = tmp_path / "runs" / "broken" / "checkpoints"
    shutil.copytree(checkpoints, broken)
    with caplog.at_level("INFO", logger="trainer"):
        _, record = fit(tiny_config(tmp_path, *cfg, "train.resume=auto"))
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping checkpoint")]
    assert (
        len(skipped) == 1 and (f"{newest / 'optimizer.bin'}: it would import posix.system when loaded") in skipped[0]
    ), skipped
    assert any(f"resumed from {checkpoints / 'step_00000002'}" in r.getMessage() for r in caplog.records)
    full, cut = (load_file(str(tmp_path / "runs" / name / "model.safetensors")) for name in ("full", "cut"))
    assert record["step"] == 8 and all(torch.equal(full[k], cut[k]) for k in full)

    older = broken / "step_00000002" / "model.safetensors"
    older.write_bytes(older.read_bytes()[:100])  # truncated
    caplog.clear()
    with caplog.at_level("WARNING", logger="trainer"), pytest.raises(CheckpointError) as err:
        fit(tiny_config(tmp_path, *cfg[1:], "output.run_name=broken", "train.resume=auto"))
    assert str(err.value) == (
        f"train.resume=auto: none of the 2 checkpoints in {broken} could be loaded; move them away to start fresh"
    )
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping checkpoint")]
    assert len(skipped) == 2 and f"{older}: not a complete safetensors file" in skipped[1], skipped
    assert not marker.exists()
    # NOTE: the mid-epoch resume above leaves a loader registered in Accelerate's GradientState
    # singleton (one trainer per process never notices); later in-process tests need it clean.
    GradientState._reset_state()
    Payload(marker).__reduce__()[0](*Payload(marker).__reduce__()[1])  # the payload is live: run, it leaves the marker
    assert marker.exists()
