"""The model folder: a trained model as timm and the Hugging Face hub lay it out, and its loader.

A model folder holds `config.json` in timm's hub format (architecture, num_classes,
label_names, label_descriptions, model_args and the pretrained_cfg with the input size,
mean/std, crop_pct and interpolation the run used), `model.safetensors` and a `README.md`
model card. `timm.create_model("local-dir:<folder>", pretrained=True)` (timm >= 1.0.16)
loads it with nothing else typed, and `huggingface-cli upload <repo> <folder>` publishes it.

A run writes `RUN/model/` and, with `ema.enabled`, `RUN/model_ema/` (`RunDirectory.export`).
`RUN/model.safetensors` and `RUN/model_ema.safetensors` stay where they were, as hard
links to the folders' weights (a copy where the filesystem has no links).

API (also what fine-tuning and export build on):
    hub_config(model, classes=, input_config=, test_size=) -> the config.json dict
    write_model_folder(model, folder, classes=, input_config=, test_size=, card=) -> folder
    resolve_model(path, ema=) -> ModelSource(config, weights): a model folder, a run or a checkpoint
    model_from_run(run, weights) -> (model, cfg, classes, input_config): a run without a folder, from config.yaml
    load_model_folder(path, ema=) -> (model, config): the timm model with its weights, on the CPU
    data_config(config) -> timm's resolved eval input config (input_size, crop_pct, ...)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.checkpoint import STATE_FILE, export_weights
from trainer.errors import ConfigError, DataError, ModelError
from trainer.labels import label_descriptions

if TYPE_CHECKING:
    from trainer.config import Config

log = logging.getLogger("trainer")

MODEL_FOLDER = "model"
EMA_FOLDER = "model_ema"
WEIGHTS_FILE = "model.safetensors"  # timm's HF_SAFE_WEIGHTS_NAME, the file local-dir loading looks for first
EMA_WEIGHTS_FILE = "model_ema.safetensors"  # a checkpoint's (and a run's legacy) EMA weights
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
RUN_CONFIG = "config.yaml"

# The architecture's pretrained_cfg describes timm's published weights; these keys say
# where those came from and what they were tested at, which is untrue of a run's weights.
_SOURCE_KEYS = tuple(
    "url hf_hub_id hf_hub_filename file state_dict source tag license origin_url paper_ids paper_name notes "
    "label_names label_descriptions label_offset test_input_size test_crop_pct test_pool_size".split()
)


@dataclass(frozen=True)
class ModelSource:
    """A model to load: its config.json dict (timm's hub format) and its weights file."""

    config: dict[str, Any]
    weights: Path


def _timm_model(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # a torch.compile wrapper holds the timm model


def folder_pretrained_cfg(model: torch.nn.Module, input_config: dict, test_size: int = 0) -> dict[str, Any]:
    """The model's pretrained_cfg with the run's resolved input config in place of timm's defaults.

    Args:
        input_config: timm's resolved data config of the run (`Datasets.data_config`):
            input_size, interpolation, mean, std, crop_pct, crop_mode.
        test_size: the val crop when it differed from the train crop (`test_img_size`); it
            becomes timm's `test_input_size`, which timm's validate.py prefers.
    """
    model = _timm_model(model)
    base = dict(getattr(model, "pretrained_cfg", None) or {})
    architecture_size = tuple(base.get("input_size", ()))
    for key in _SOURCE_KEYS:
        base.pop(key, None)
    size = tuple(int(v) for v in input_config["input_size"])
    base.update(
        input_size=size,
        interpolation=input_config["interpolation"],
        mean=tuple(float(v) for v in input_config["mean"]),
        std=tuple(float(v) for v in input_config["std"]),
        crop_pct=float(input_config["crop_pct"]),
        crop_mode=input_config.get("crop_mode") or "center",
        num_classes=int(model.num_classes),
    )
    if test_size and test_size != size[-1]:
        base.update(test_input_size=(size[0], test_size, test_size), test_crop_pct=base["crop_pct"])
    if architecture_size[1:] != size[1:]:
        base.pop("pool_size", None)  # the feature map size at timm's default input, not at this one
    return base


def hub_config(model: torch.nn.Module, *, classes: list[str], input_config: dict, test_size: int = 0) -> dict[str, Any]:
    """config.json of `model` as timm writes it, with the run's classes and input config.

    NOTE: written by timm's own `save_config_for_hf` (timm/models/_hub.py, in every timm
    1.x), which reads the model's `pretrained_cfg`: it is swapped for the run's for the
    call. `label_names` are the training classes in index order (outputs past them, when
    `model.num_classes` exceeds the data's classes, are named by their index);
    `label_descriptions` are added for ImageNet synsets.
    """
    from timm.models._hub import save_config_for_hf

    model = _timm_model(model)
    names = [str(c) for c in classes][: model.num_classes]
    names += [str(i) for i in range(len(names), model.num_classes)]
    labels: dict[str, Any] = {"label_names": names}
    descriptions = label_descriptions(names)
    if descriptions:
        labels["label_descriptions"] = descriptions
    original = model.pretrained_cfg
    model.pretrained_cfg = folder_pretrained_cfg(model, input_config, test_size)
    try:
        with tempfile.TemporaryDirectory(prefix="trainer-config-") as tmp:
            path = Path(tmp) / CONFIG_FILE
            save_config_for_hf(model, path, model_config=labels)
            return json.loads(path.read_text())
    finally:
        model.pretrained_cfg = original


def write_model_folder(
    model: torch.nn.Module,
    folder: Path,
    *,
    classes: list[str],
    input_config: dict,
    test_size: int = 0,
    card: str = "",
) -> Path:
    """Write `folder` (config.json, model.safetensors, README.md) whole or not at all; returns it.

    The weights are written by `export_weights` rather than timm's `save_for_hf`, which
    saves `model.state_dict()` as it is: a channels_last model's weights are not
    contiguous, which safetensors refuses, and its file would be created 0600.
    Raises OSError or SafetensorError (a full disk); an earlier folder is then intact.
    """
    folder = Path(folder)
    config = hub_config(model, classes=classes, input_config=input_config, test_size=test_size)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        export_weights(_timm_model(model), tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if card:
            (tmp / CARD_FILE).write_text(card)
        old = folder.with_name(f".old-{folder.name}")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():  # moved aside, not deleted first: the window without a folder is two renames
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def link_weights(folder: Path, legacy: Path) -> None:
    """`legacy` (RUN/model.safetensors) as the same file as the folder's weights: a hard link, else a copy."""
    tmp = legacy.with_name(f".{legacy.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(folder / WEIGHTS_FILE, tmp)
    except OSError:  # a filesystem without hard links
        shutil.copy2(folder / WEIGHTS_FILE, tmp)
    os.replace(tmp, legacy)


def read_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json; a one-line ModelError when it cannot be used."""
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: unreadable ({err})") from None
    usable = isinstance(config, dict) and config.get("architecture") and isinstance(config.get("pretrained_cfg"), dict)
    if not usable:
        raise ModelError(f"{path}: not a timm model config (needs architecture and pretrained_cfg)")
    return config


def run_config(run: Path) -> Config:
    """The run's resolved recipe; a one-line ModelError when there is none."""
    from trainer.config import load_config

    path = run / RUN_CONFIG
    if not path.is_file():
        raise ModelError(f"{run}: not a run directory (no {RUN_CONFIG})")
    return load_config(path)


def run_classes(cfg: Config) -> list[str]:
    """The training classes in index order, from the run's data; [] (outputs named by index) when it is gone."""
    from trainer.data.sources import class_names, create_reader

    try:
        return class_names(cfg.data) or list(create_reader(cfg.data, cfg.data.train_split).classes)
    except (DataError, ConfigError, OSError) as err:
        log.warning("class names unavailable, outputs named by index: %s", err)
        return []


def _head_size(model_name: str, weights: Path) -> int:
    """The classifier's outputs in a weights file, 0 when it cannot tell."""
    import timm.models
    from safetensors import SafetensorError, safe_open

    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    classifier = pretrained_cfg.classifier if pretrained_cfg else None
    first = classifier if isinstance(classifier, str) else (classifier or [None])[0]
    try:
        with safe_open(str(weights), framework="pt") as f:
            key = f"{first}.weight"
            return f.get_slice(key).get_shape()[0] if key in f.keys() else 0
    except (OSError, SafetensorError) as err:
        raise ModelError(f"{weights}: unreadable weights ({err})") from None


def model_from_run(run: Path, weights: Path) -> tuple[torch.nn.Module, Config, list[str], dict[str, Any]]:
    """The model of a run from its config.yaml, `weights` loaded; with its config, classes and resolved input config."""
    from trainer.data.loader import resolve_input_config
    from trainer.model import create_model

    cfg = run_config(run)
    classes = run_classes(cfg)
    num_classes = cfg.model.num_classes or len(classes) or _head_size(cfg.model.name, weights)
    if not num_classes:
        raise ModelError(f"{weights}: the number of classes is unknown (no classes in the data, no model.num_classes)")
    cfg.model.pretrained_file = ""  # the run's weights replace whatever it started from
    model = create_model(cfg.model, num_classes)
    load_weights_file(model, weights)
    return model.eval(), cfg, classes, resolve_input_config(cfg.input, cfg.model.name)


def resolve_model(path: str | Path, ema: bool = False) -> ModelSource:
    """The config and weights behind `path`: a model folder, a run directory or a checkpoint directory.

    A run's `model/` (`model_ema/` with `ema`) folder is used when it has one; a run from
    before model folders, and a checkpoint, get their config from the run's config.yaml.
    """
    path = Path(path).expanduser()
    if (path / CONFIG_FILE).is_file():
        if ema:
            instead = f"give the run directory or {EMA_FOLDER}/"
            raise ModelError(f"--ema: {path} is a model folder, one set of weights; {instead}")
        return ModelSource(read_config(path), path / WEIGHTS_FILE)
    if (path / STATE_FILE).is_file():  # RUN/checkpoints/step_N/
        run, weights = path.parent.parent, path / (EMA_WEIGHTS_FILE if ema else WEIGHTS_FILE)
    elif (path / RUN_CONFIG).is_file():
        run, weights = path, path / (EMA_FOLDER if ema else MODEL_FOLDER) / WEIGHTS_FILE
        if not weights.is_file():  # a run from before model folders
            weights = path / (EMA_WEIGHTS_FILE if ema else WEIGHTS_FILE)
    elif path.exists():
        kinds = f"a model folder ({CONFIG_FILE}), a run directory ({RUN_CONFIG}) nor a checkpoint ({STATE_FILE})"
        raise ModelError(f"{path}: neither {kinds}")
    else:
        raise ModelError(f"{path}: no such model folder, run directory or checkpoint")
    if not weights.is_file():
        hint = " (the run had ema.enabled off)" if ema else " (an unfinished run: give one of its checkpoints)"
        raise ModelError(f"{weights}: not found{hint}")
    folder = run / (EMA_FOLDER if ema else MODEL_FOLDER)
    if (folder / CONFIG_FILE).is_file():
        return ModelSource(read_config(folder), weights)
    model, cfg, classes, input_config = model_from_run(run, weights)
    config = hub_config(model, classes=classes, input_config=input_config, test_size=cfg.input.test_img_size)
    return ModelSource(config, weights)


def create_from_config(config: dict[str, Any]) -> torch.nn.Module:
    """The config's architecture with its classes and reconstruction args, untrained, its pretrained_cfg set."""
    import timm

    name = config["architecture"]
    if not timm.is_model(name):
        raise ModelError(f"config.json: architecture '{name}' is not a model this timm {timm.__version__} knows")
    kwargs = dict(config.get("model_args") or {})
    kwargs["num_classes"] = int(config["num_classes"])
    model = timm.create_model(name, pretrained=False, **kwargs)
    # As timm's own local-dir loading does: the folder's input config and labels become the model's.
    model.pretrained_cfg = {
        **config["pretrained_cfg"],
        "architecture": name,
        **{k: config[k] for k in ("label_names", "label_descriptions") if k in config},
    }
    return model


def load_weights_file(model: torch.nn.Module, weights: Path) -> None:
    """Load a safetensors file into `model`, every tensor by name; a one-line ModelError when it does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError, SafetensorError) as err:
        detail = " ".join(line.strip() for line in str(err).strip().splitlines()[:2]) or type(err).__name__
        what = f"{type(model).__name__} with {model.num_classes} classes"
        raise ModelError(f"{weights}: does not fit {what}: {detail}") from None


def load_model_folder(path: str | Path, ema: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model behind `path` (a model folder, run or checkpoint), in eval mode on the CPU, and its config."""
    source = resolve_model(path, ema)
    model = create_from_config(source.config)
    load_weights_file(model, source.weights)
    return model.eval(), source.config


def class_labels(config: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """(label name per output index, descriptions by name) from a config.json dict."""
    count = int(config["num_classes"])
    names = [str(n) for n in (config.get("label_names") or [])][:count]
    names += [str(i) for i in range(len(names), count)]
    return names, dict(config.get("label_descriptions") or {})


def data_config(config: dict[str, Any]) -> dict[str, Any]:
    """The eval-time input config of a config.json: timm's resolve_data_config over its pretrained_cfg.

    NOTE: `use_test_size=True`, as timm's validate.py resolves it: a run that validated at
    `test_img_size` recorded it as `test_input_size` (timm/data/config.py).
    """
    from timm.data import resolve_data_config

    resolved = resolve_data_config({}, pretrained_cfg=config["pretrained_cfg"], use_test_size=True)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in resolved.items()}  # JSON gives lists
