"""`trainer import-args`: every flag of pytorch/examples imagenet/main.py maps to a key, a launch flag,
or a named reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.config import ConfigError, load_config
from trainer.import_args import MAIN_PY_DEFAULTS, import_main_py_args, main_py_parser, render

REPO = Path(__file__).resolve().parent.parent
GUIDE = (
    "python main.py /data/imagenet -a resnet50 -b 128 --lr 0.1 --epochs 90 --workers 40 --dist-backend cncl "
    "--multiprocessing-distributed --world-size 1 --rank 0 --dist-url tcp://127.0.0.1:65501"
).split()


def run(argv, **kwargs):
    return import_main_py_args(list(argv), **kwargs)


def loads(imported, tmp_path):
    """The rendered recipe is a config the trainer accepts."""
    path = tmp_path / "recipe.yaml"
    path.write_text(render(imported, ["python", "main.py"]))
    return load_config(path)


def test_the_migration_guide_command(tmp_path):
    out = run(GUIDE, devices_per_machine=8)
    cfg = loads(out, tmp_path)
    assert cfg.model.name == "resnet50" and cfg.data.root == "/data/imagenet"
    assert cfg.loader.batch_size_per_device == 16  # main.py divides -b by the devices of the machine
    assert cfg.loader.workers == 5  # and -j, rounded up
    assert cfg.optim.lr == 0.1 and cfg.train.epochs == 90 and cfg.optim.name == "sgd"
    assert out.command == (
        "accelerate launch --config_file "
        "configs/accelerate/mlu_8card.yaml --main_process_port 65501 -m "
        "trainer train --config recipe.yaml"
    )
    assert out.unmapped == []
    # The rest is the guide's recipe file: transforms, schedule, fp32.
    base = load_config(REPO / "configs" / "resnet50_imagenet.yaml")
    assert cfg.schedule == base.schedule and cfg.train.precision == "fp32" and cfg.input.img_size == 224


def test_defaults_are_main_pys(tmp_path):
    parser_flags = {a.dest for a in main_py_parser()._actions}
    assert parser_flags == set(MAIN_PY_DEFAULTS)
    out = run(["python", "main.py"], device="cpu")
    cfg = loads(out, tmp_path)
    assert cfg.model.name == "resnet18" and cfg.data.root == "imagenet" and cfg.loader.batch_size_per_device == 256
    assert (
        cfg.loader.workers == 4
        and cfg.optim.momentum == 0.9
        and cfg.optim.weight_decay == 1e-4
        and cfg.train.log_every_steps == 10
    )
    assert out.command == (
        "accelerate launch --config_file configs/accelerate/cpu_1proc.yaml -m trainer train --config recipe.yaml"
    )


@pytest.mark.parametrize(
    ("flags", "section", "key", "value"),
    [
        (["/x"], "data", "root", "/x"),
        (["-a", "resnet101"], "model", "name", "resnet101"),
        (["--arch", "resnet34"], "model", "name", "resnet34"),
        (["-j", "7"], "loader", "workers", 7),
        (["--workers", "3"], "loader", "workers", 3),
        (["--epochs", "5"], "train", "epochs", 5),
        (["-b", "64"], "loader", "batch_size_per_device", 64),
        (["--batch-size", "32"], "loader", "batch_size_per_device", 32),
        (["--lr", "0.4"], "optim", "lr", 0.4),
        (["--learning-rate", "0.2"], "optim", "lr", 0.2),
        (["--momentum", "0.8"], "optim", "momentum", 0.8),
        (["--wd", "5e-5"], "optim", "weight_decay", 5e-5),
        (["--weight-decay", "3e-5"], "optim", "weight_decay", 3e-5),
        (["-p", "100"], "train", "log_every_steps", 100),
        (["--print-freq", "20"], "train", "log_every_steps", 20),
        (["--seed", "42"], "train", "seed", 42),
        (["--resume", "ckpt.pth.tar"], "model", "pretrained", "ckpt.pth.tar"),
    ],
)
def test_each_value_flag_maps_to_its_key(flags, section, key, value, tmp_path):
    cfg = loads(run(["main.py", *flags], device="cpu"), tmp_path)
    assert getattr(getattr(cfg, section), key) == value


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--start-epoch", "3"], "--start-epoch 3"),
        (["--resume", "ckpt.pth.tar"], "--resume ckpt.pth.tar"),  # weights only: named for what is lost
        (["--pretrained"], "--pretrained"),
        (["--dummy"], "--dummy"),
        (["-a", "not_a_model"], "-a not_a_model"),
        (["--fp16"], "--fp16"),  # an older main.py's flag
        (["--dist-url", "env://"], "--dist-url env://"),
        (["--rank", "2"], "--rank 2"),
        (["--world-size", "2"], "--world-size 2"),
        (["--dist-backend", "mpi"], "--dist-backend mpi"),
        (["--multiprocessing-distributed", "--gpu", "1"], "--gpu 1"),
    ],
)
def test_flags_that_cannot_map_are_named(flags, named):
    out = run(["main.py", *flags])
    assert any(line.startswith(named) for line in out.unmapped), out.unmapped


def test_start_epoch_zero_and_rank_zero_need_no_mention():
    assert run(["main.py", "--start-epoch", "0", "--rank", "0"], device="cpu").unmapped == []


def test_evaluate_gives_an_eval_command():
    out = run(["main.py", "-e", "--gpu", "0", "--dist-backend", "cncl"])
    assert out.command.startswith(
        "MLU_VISIBLE_DEVICES=0 accelerate launch --config_file configs/accelerate/mlu_1card.yaml "
    )
    assert "-m trainer eval --config recipe.yaml --checkpoint " in out.command


@pytest.mark.parametrize(
    ("flags", "device", "config"),
    [
        (["--dist-backend", "nccl"], "auto", "cuda_1gpu.yaml"),  # main.py's default backend is nccl: CUDA
        (["--dist-backend", "cncl"], "auto", "mlu_1card.yaml"),
        (["--dist-backend", "gloo"], "auto", "cpu_1proc.yaml"),
        (["--no-accel"], "auto", "cpu_1proc.yaml"),
        (["--dist-backend", "nccl"], "mlu", "mlu_1card.yaml"),  # --device wins
    ],
)
def test_device_follows_the_backend(flags, device, config):
    out = run(["main.py", *flags], device=device)
    assert f"configs/accelerate/{config}" in out.command


def test_gpu_pins_one_visible_device():
    out = run(["main.py", "--gpu", "3", "--dist-backend", "nccl", "-b", "100"])
    assert out.command.startswith(
        "CUDA_VISIBLE_DEVICES=3 accelerate launch --config_file configs/accelerate/cuda_1gpu.yaml"
    )
    assert out.recipe["loader"]["batch_size_per_device"] == 100


def test_multiprocessing_distributed_counts_without_a_shipped_file():
    out = run(
        [
            "main.py",
            "--multiprocessing-distributed",
            "--dist-backend",
            "cncl",
            "-b",
            "256",
            "--dist-url",
            "tcp://h:1234",
        ],
        devices_per_machine=4,
    )
    assert "--config_file configs/accelerate/mlu_8card.yaml --num_processes 4" in out.command
    assert "--main_process_port 1234" in out.command and out.recipe["loader"]["batch_size_per_device"] == 64
    assert any("assumed" in n for n in run(["main.py", "--multiprocessing-distributed"]).notes)


def test_several_machines():
    out = run(
        [
            "main.py",
            "--multiprocessing-distributed",
            "--world-size",
            "2",
            "--rank",
            "1",
            "--dist-backend",
            "cncl",
            "--dist-url",
            "tcp://10.0.0.1:23456",
            "-b",
            "128",
        ],
        devices_per_machine=8,
    )
    assert out.command.startswith(
        "accelerate launch --config_file configs/accelerate/multi_node_mlu.yaml --machine_rank 1 "
        "--main_process_ip 10.0.0.1 --main_process_port 23456 -m trainer train"
    )
    assert out.unmapped == []
    out = run(
        ["main.py", "--multiprocessing-distributed", "--world-size", "4", "--dist-backend", "cncl"],
        devices_per_machine=8,
    )
    assert "--num_processes 32 --num_machines 4" in out.command


def test_batch_not_divisible_is_noted():
    out = run(
        ["main.py", "--multiprocessing-distributed", "-b", "100", "--dist-backend", "cncl"], devices_per_machine=8
    )
    assert out.recipe["loader"]["batch_size_per_device"] == 12 and any("rounds" in n for n in out.notes)


def test_bad_values_are_one_line_errors():
    with pytest.raises(
        ConfigError, match=r"import-args: main.py command line: argument -b/--batch-size: " r"invalid int value: 'x'"
    ):
        run(["main.py", "-b", "x"])


@pytest.mark.slow
def test_cli_prints_yaml_and_names_what_it_cannot_map(tmp_path):
    cmd = [sys.executable, "-m", "trainer", "import-args", "--devices", "8", "--", *GUIDE, "--pretrained"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["loader"]["batch_size_per_device"] == 16
    assert "# launch with:\n#   accelerate launch --config_file configs/accelerate/mlu_8card.yaml" in proc.stdout
    assert "trainer: not mapped: --pretrained" in proc.stderr
    out = tmp_path / "r.yaml"
    proc = subprocess.run(
        [*cmd[:4], "--output", str(out), *cmd[4:]], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.stdout.splitlines()[-1].endswith(f"-m trainer train --config {out}")
    assert load_config(out).model.name == "resnet50"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "import-args", "--", "main.py", "--epochs", "ten"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--epochs" in proc.stderr
