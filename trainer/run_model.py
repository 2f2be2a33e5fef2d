"""A run's model rebuilt from its config.yaml, and `trainer model-folder RUN`: model folders for existing runs.

Runs from before model folders left `model.safetensors` (and `model_ema.safetensors`) with
config.yaml beside them; that is enough to write the folder: the architecture and input
config from the recipe, the class names from the data it names (when it is still there).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from trainer.config import Config, load_config
from trainer.errors import ConfigError, DataError, ModelError
from trainer.model_folder import (
    EMA_FOLDER,
    EMA_WEIGHTS_FILE,
    MODEL_FOLDER,
    RUN_CONFIG,
    WEIGHTS_FILE,
    hub_config,
    link_weights,
    load_weights_file,
    write_model_folder,
)

log = logging.getLogger("trainer")


def run_config(run: Path) -> Config:
    """The run's resolved recipe; a one-line ModelError when there is none."""
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
    """The run's model with `weights` loaded, its config, its classes and its resolved input config."""
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
    return model.eval(), cfg, classes, resolve_input_config(cfg.data, cfg.model.name)


def config_from_run(run: Path, weights: Path) -> dict[str, Any]:
    """config.json of `weights` from the run's config.yaml (a run or checkpoint without a model folder)."""
    model, cfg, classes, input_config = model_from_run(run, weights)
    return hub_config(model, classes=classes, input_config=input_config, test_size=cfg.data.test_img_size)


def export_run_folder(
    run: Path,
    cfg: Config,
    model: torch.nn.Module,
    *,
    classes: list[str],
    input_config: dict,
    ema: bool,
    processes: int = 0,
    link: bool = True,
) -> Path:
    """Write RUN/model/ (RUN/model_ema/ with `ema`) and its card; with `link`, RUN/model.safetensors too."""
    from trainer.metrics import METRICS_FILENAME, read_metrics
    from trainer.model_card import model_card

    folder = run / (EMA_FOLDER if ema else MODEL_FOLDER)
    config = hub_config(model, classes=classes, input_config=input_config, test_size=cfg.data.test_img_size)
    records = read_metrics(run, skip_malformed=True) if (run / METRICS_FILENAME).is_file() else []
    card = model_card(cfg, records, config=config, run_dir=run, ema=ema, processes=processes)
    test_size = cfg.data.test_img_size
    write_model_folder(model, folder, classes=classes, input_config=input_config, test_size=test_size, card=card)
    if link:
        link_weights(folder, run / (EMA_WEIGHTS_FILE if ema else WEIGHTS_FILE))
    return folder


def model_folder_command(args: Any) -> int:
    """`trainer model-folder RUN [--checkpoint DIR]`: write RUN/model/ (and RUN/model_ema/) from the run's weights."""
    from safetensors import SafetensorError

    from trainer.checkpoint import write_failure
    from trainer.errors import CheckpointError
    from trainer.progress import setup_logging

    setup_logging(True, False)
    run = Path(args.run_dir).expanduser()
    source = Path(args.checkpoint).expanduser() if args.checkpoint else run
    written = []
    for ema, name in ((False, WEIGHTS_FILE), (True, EMA_WEIGHTS_FILE)):
        weights = source / name
        if not weights.is_file():
            if not ema:
                hint = "an unfinished run: give --checkpoint RUN/checkpoints/step_N"
                hint = "not a checkpoint" if args.checkpoint else hint
                raise ModelError(f"{weights}: not found ({hint})")
            continue
        model, cfg, classes, input_config = model_from_run(run, weights)
        try:
            # NOTE: a checkpoint's weights make no RUN/model.safetensors: that file says the run finished
            link = not args.checkpoint
            folder = export_run_folder(run, cfg, model, classes=classes, input_config=input_config, ema=ema, link=link)
            written.append(folder)
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{run}: writing the model folder failed ({write_failure(err)})") from None
    for folder in written:
        print(folder)
    return 0
