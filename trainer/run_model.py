"""A run's model folders written, with their cards: at the end of training and by `trainer model-folder RUN`.

Runs from before model folders left `model.safetensors` (and `model_ema.safetensors`) with
config.yaml beside them; that is enough to write the folder (`model_folder.model_from_run`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.config import Config
from trainer.errors import ModelError
from trainer.model_folder import (
    EMA_FOLDER,
    EMA_WEIGHTS_FILE,
    MODEL_FOLDER,
    WEIGHTS_FILE,
    hub_config,
    link_weights,
    model_from_run,
    write_model_folder,
)


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
    config = hub_config(model, classes=classes, input_config=input_config, test_size=cfg.input.test_img_size)
    records = read_metrics(run, skip_malformed=True) if (run / METRICS_FILENAME).is_file() else []
    card = model_card(cfg, records, config=config, run_dir=run, ema=ema, processes=processes)
    test_size = cfg.input.test_img_size
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
