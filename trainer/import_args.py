"""`trainer import-args -- python main.py ...`: the reference command line as a recipe and a launch command.

Users arrive with a command line for PyTorch's `imagenet/main.py` (pytorch/examples), as
the migration guide gives it. This module reads that command line with main.py's own
flags and defaults (re-declared here, not imported), writes the equivalent recipe on top
of `configs/resnet50_imagenet.yaml` (the guide's transforms and schedule), picks the shipped
`configs/accelerate/` file for the device and process count, and names every flag it
cannot carry over with the reason.

What main.py means by its flags, and how each maps:

1. `-b` is the batch of one machine: with `--multiprocessing-distributed` (and with
   DataParallel) main.py divides it by the devices per machine, so the per-device batch
   is `b // devices`; `-j` is divided the same way, rounded up.
2. `--world-size` counts machines under `--multiprocessing-distributed` and `--rank` is
   the machine's rank; both go to `accelerate launch`, as does `--dist-url`'s host:port.
3. `--dist-backend` names the device (the collective follows the device here).
4. `-p` (print every N iterations) is `train.log_every_steps`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.backend import (
    DEVICE_TYPES,
    HOST_DEVICE_TYPE,
    PROCESS_GROUP_BACKENDS,
    REFERENCE_DEFAULT_PROCESS_GROUP,
    VISIBLE_DEVICES_VARS,
    device_for_process_group,
)
from trainer.config import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BASE_RECIPE = CONFIGS / "resnet50_imagenet.yaml"
# main.py's defaults (pytorch/examples imagenet/main.py), used for flags the command omits.
MAIN_PY_DEFAULTS: dict[str, Any] = {
    "data": "imagenet",
    "arch": "resnet18",
    "workers": 4,
    "epochs": 90,
    "start_epoch": 0,
    "batch_size": 256,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "print_freq": 10,
    "resume": "",
    "evaluate": False,
    "pretrained": False,
    "world_size": -1,
    "rank": -1,
    "dist_url": "tcp://224.66.41.62:23456",
    "dist_backend": REFERENCE_DEFAULT_PROCESS_GROUP,
    "seed": None,
    "gpu": None,
    "no_accel": False,
    "multiprocessing_distributed": False,
    "dummy": False,
}
DEFAULT_DEVICES_PER_MACHINE = 8


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit
        raise ConfigError(f"import-args: main.py command line: {message}")


def main_py_parser() -> argparse.ArgumentParser:
    """main.py's flags; defaults are SUPPRESSed so that the namespace holds only what was given."""
    p = _Parser(prog="main.py", add_help=False, argument_default=argparse.SUPPRESS, allow_abbrev=False)
    p.add_argument("data", nargs="?")
    p.add_argument("-a", "--arch")
    p.add_argument("-j", "--workers", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--start-epoch", type=int)
    p.add_argument("-b", "--batch-size", type=int)
    p.add_argument("--lr", "--learning-rate", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float)
    p.add_argument("-p", "--print-freq", type=int)
    p.add_argument("--resume")
    p.add_argument("-e", "--evaluate", action="store_true")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--world-size", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--dist-url")
    p.add_argument("--dist-backend")
    p.add_argument("--seed", type=int)
    p.add_argument("--gpu", type=int)
    p.add_argument("--no-accel", action="store_true")
    p.add_argument("--multiprocessing-distributed", action="store_true")
    p.add_argument("--dummy", action="store_true")
    return p


@dataclass
class Imported:
    """The result: a recipe (section -> key -> value), the launch command, and what did not map."""

    recipe: dict[str, dict[str, Any]]
    command: str
    unmapped: list[str] = field(default_factory=list)  # "--flag value: why", one per flag
    notes: list[str] = field(default_factory=list)  # how mapped flags were read


def _strip_interpreter(argv: list[str]) -> list[str]:
    """Drop a leading `python[3]` and `main.py` (any path to them)."""
    args = list(argv)
    if args and Path(args[0]).name.startswith("python"):
        args = args[1:]
    if args and args[0].endswith(".py"):
        args = args[1:]
    return args


def _launch_config(device: str, processes: int, machines: int) -> tuple[Path | None, list[str]]:
    """The shipped accelerate config for device and count, plus the launch flags it still needs."""
    candidates = []
    for path in sorted((CONFIGS / "accelerate").glob("*.yaml")):
        stem = path.stem
        if not (stem.startswith(f"{device}_") or stem == f"multi_node_{device}"):
            continue
        raw = yaml.safe_load(path.read_text())
        candidates.append((path, int(raw.get("num_processes", 1)), int(raw.get("num_machines", 1))))
    if not candidates:
        return None, [f"--num_processes {processes}", f"--num_machines {machines}"]
    exact = [c for c in candidates if c[1] == processes and c[2] == machines]
    if exact:
        return exact[0][0], []
    # The closest shipped file of the right kind (one process, one machine, several machines), overridden.
    kind = [c for c in candidates if (c[2] > 1) == (machines > 1) and (c[1] > 1) == (processes > 1)] or candidates
    path, _, file_machines = kind[-1]
    extra = [f"--num_processes {processes}"] + ([f"--num_machines {machines}"] if machines != file_machines else [])
    return path, extra


def import_main_py_args(
    argv: list[str], device: str = "auto", devices_per_machine: int = 0, recipe_path: str = "recipe.yaml"
) -> Imported:
    """Map a `python main.py ...` command line to a recipe and an `accelerate launch` command.

    Args:
        argv: the command line, with or without the leading `python main.py`.
        device: the device to launch on; auto reads it from --no-accel / --dist-backend.
        devices_per_machine: devices each machine launches on under
            --multiprocessing-distributed (main.py counts them itself); 0 assumes 8.
        recipe_path: where the recipe will be written, for the command.

    Raises:
        ConfigError: for a command line main.py itself would reject.
    """
    given, unknown = main_py_parser().parse_known_args(_strip_interpreter(argv))
    given = vars(given)
    a = {**MAIN_PY_DEFAULTS, **given}
    unmapped = [f"{token}: not a flag of imagenet/main.py" for token in unknown]
    notes: list[str] = []
    recipe = yaml.safe_load(BASE_RECIPE.read_text())
    data, loader, optim, train = recipe["data"], recipe["loader"], recipe["optim"], recipe["train"]

    # -- device and processes ------------------------------------------------------
    if device == "auto":
        device = HOST_DEVICE_TYPE if a["no_accel"] else device_for_process_group(a["dist_backend"]) or ""
        if not device:
            unmapped.append(
                f"--dist-backend {a['dist_backend']}: no device uses this process group here; pass import-args --device"
            )
            device = HOST_DEVICE_TYPE
    elif "dist_backend" in given and device_for_process_group(given["dist_backend"]) not in (device, None):
        notes.append(
            f"--dist-backend {given['dist_backend']}: replaced by "
            f"{PROCESS_GROUP_BACKENDS[device]}, the process group of --device "
            f"{device}"
        )
    env: list[str] = []
    distributed = a["multiprocessing_distributed"]
    if a["gpu"] is not None and not distributed:
        processes = 1
        if device in VISIBLE_DEVICES_VARS:
            env.append(f"{VISIBLE_DEVICES_VARS[device][-1]}={a['gpu']}")  # device i becomes the only one, index 0
        notes.append(f"--gpu {a['gpu']}: the only visible device, through the environment")
    elif distributed:
        processes = devices_per_machine or DEFAULT_DEVICES_PER_MACHINE
        if not devices_per_machine:
            notes.append(
                "--multiprocessing-distributed: main.py launches one process per "
                f"device it finds; assumed {processes} per machine (set "
                "import-args --devices)"
            )
        if a["gpu"] is not None:
            unmapped.append(f"--gpu {a['gpu']}: ignored under --multiprocessing-distributed, as main.py ignores it")
    else:  # main.py wraps the model in DataParallel over every device: one process per device here
        processes = devices_per_machine or 1
        if processes > 1:
            notes.append(f"DataParallel over {processes} devices: one process per device, the batch split between them")
    machines = max(a["world_size"], 1) if distributed else 1
    if not distributed and a["world_size"] > 1:
        unmapped.append(
            f"--world-size {a['world_size']} without "
            "--multiprocessing-distributed: one process per machine, each "
            "over all its devices, has no equivalent; use "
            "--multiprocessing-distributed"
        )
    if device == HOST_DEVICE_TYPE:
        processes = processes if distributed else 1

    # -- data, model, optimizer, schedule ------------------------------------------
    data["root"] = a["data"]
    if a["batch_size"] % processes:
        notes.append(
            f"-b {a['batch_size']} is not divisible by {processes} processes: "
            "main.py rounds each process's share down to "
            f"{a['batch_size'] // processes}"
        )
    loader["batch_size_per_device"] = max(a["batch_size"] // processes, 1)
    if processes > 1:
        notes.append(
            f"-b {a['batch_size']} is main.py's batch per machine: "
            f"{loader['batch_size_per_device']} per device over {processes} "
            "devices"
        )
    loader.pop("val_batch_size_per_device", None)
    loader["workers"] = math.ceil(a["workers"] / processes) if processes > 1 else a["workers"]
    import timm

    if timm.is_model(a["arch"]):
        recipe["model"]["name"] = a["arch"]
    else:
        unmapped.append(f"-a {a['arch']}: timm has no model of that name; set model.name to a timm architecture")
    optim.update(lr=a["lr"], momentum=a["momentum"], weight_decay=a["weight_decay"])
    train["epochs"] = a["epochs"]
    train["log_every_steps"] = a["print_freq"]
    if a["seed"] is not None:
        train["seed"] = a["seed"]
    if a["start_epoch"]:
        unmapped.append(
            f"--start-epoch {a['start_epoch']}: the epoch to start at comes "
            "from the checkpoint (train.resume=auto), never by hand"
        )
    if a["resume"]:
        recipe["model"]["pretrained"] = a["resume"]
        unmapped.append(
            f"--resume {a['resume']}: only its weights carry over (model.pretrained); its optimizer state, epoch and "
            "best top-1 do not, so training starts at epoch 1"
        )
    if a["pretrained"]:
        unmapped.append("--pretrained: nothing is downloaded; set model.pretrained to a local model or file")
    if a["dummy"]:
        unmapped.append("--dummy: no synthetic-data mode; `trainer bench` times the model step without reading data")

    # -- the launch command ----------------------------------------------------------
    config, extra = _launch_config(device, processes * machines, machines)
    launch = ["accelerate launch"] + ([f"--config_file {os.path.relpath(config)}"] if config else []) + extra
    if machines > 1:
        launch.append(f"--machine_rank {max(a['rank'], 0)}")
    url = a["dist_url"]
    if url.startswith("tcp://") and (machines > 1 or processes > 1):
        host, _, port = url[len("tcp://") :].rpartition(":")
        if machines > 1:
            launch.append(f"--main_process_ip {host}")
        if port.isdigit():
            launch.append(f"--main_process_port {port}")
    elif "dist_url" in given and not url.startswith("tcp://"):
        unmapped.append(
            f"--dist-url {url}: only tcp://host:port maps to accelerate launch's --main_process_ip/--main_process_port"
        )
    if machines == 1 and a["rank"] > 0:
        unmapped.append(f"--rank {a['rank']}: a single machine has rank 0")
    if a["evaluate"]:
        action = f"-m trainer eval --config {recipe_path} --checkpoint RUN_DIR/model.safetensors"
        notes.append(
            "-e: `trainer eval` validates weights this trainer wrote (a checkpoint directory or a .safetensors file)"
        )
    else:
        action = f"-m trainer train --config {recipe_path}"
    command = " ".join(env + launch + [action])
    return Imported(recipe, command, unmapped, notes)


def render(imported: Imported, argv: list[str]) -> str:
    """The recipe as YAML, headed by where it came from; the command and the unmapped flags as comments."""
    lines = [
        "# Imported by `trainer import-args` from:",
        f"#   {' '.join(argv)}",
        "# on top of configs/resnet50_imagenet.yaml (the migration guide's transforms and lr schedule).",
    ]
    lines += [f"# note: {n}" for n in imported.notes]
    lines += [f"# NOT MAPPED: {u}" for u in imported.unmapped]
    lines += [
        "# launch with:",
        f"#   {imported.command}",
        yaml.safe_dump(imported.recipe, sort_keys=False, default_flow_style=None).rstrip(),
    ]
    return "\n".join(lines) + "\n"


def import_args_command(args: argparse.Namespace) -> int:
    argv = list(args.main_py)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ConfigError(
            "import-args: give main.py's command line after --, e.g. trainer "
            "import-args -- python main.py /data/imagenet -a resnet50"
        )
    if args.device not in ("auto", *DEVICE_TYPES):
        raise ConfigError(f"import-args: --device {args.device!r} is not one of auto, {', '.join(DEVICE_TYPES)}")
    if args.devices < 0:
        raise ConfigError(f"import-args: --devices must be >= 0, got {args.devices}")
    out = Path(args.output) if args.output else None
    imported = import_main_py_args(argv, args.device, args.devices, str(out) if out else "recipe.yaml")
    text = render(imported, argv)
    if out is None:  # stdout stays a valid YAML file: `trainer import-args -- ... > recipe.yaml`
        print(text, end="")
    else:
        out.write_text(text)
        print(f"wrote {out}")
        print(imported.command)
    for line in imported.unmapped:
        print(f"trainer: not mapped: {line}", file=sys.stderr)
    return 0
