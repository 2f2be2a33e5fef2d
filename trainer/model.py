"""create_model over timm: any timm architecture, weights only from local files (`trainer.pretrained`)."""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Iterator
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError

from trainer.config import ModelConfig
from trainer.errors import ModelError
from trainer.pretrained import KEY, resolve_pretrained

log = logging.getLogger("trainer")


def create_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """Build `cfg.name` with `num_classes` outputs, optionally from the weights `cfg.pretrained` names.

    The weights are read through timm's `pretrained_cfg_overlay=dict(file=...)`, which
    loads safetensors, or torch files with `weights_only=True`, and re-initialises the
    classifier when its size differs (one log line says so); nothing is fetched from a hub.
    """
    if not timm.is_model(cfg.name):
        base = cfg.name.split(".")[0]
        # Substring matches catch a shortened name; difflib catches a typo (resnet5o).
        close = timm.list_models(f"*{base[:8]}*")[:5] or difflib.get_close_matches(base, timm.list_models(), n=5)
        raise ModelError(
            f"model.name: unknown timm model '{cfg.name}'" + (f" (similar: {', '.join(close)})" if close else "")
        )
    kwargs = dict(num_classes=num_classes, drop_rate=cfg.drop_rate)
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if not cfg.pretrained:
        return timm.create_model(cfg.name, pretrained=False, **kwargs)
    source = resolve_pretrained(cfg.pretrained)
    path = source.weights
    if source.architecture and source.architecture.split(".")[0] != cfg.name.split(".")[0]:
        arch = source.architecture
        raise ModelError(f"{KEY}: {source.described} holds a {arch}, not model.name {cfg.name}; set model.name={arch}")
    classifiers = _classifier_names(cfg.name)
    heads = {f"{c}.{suffix}" for c in classifiers for suffix in ("weight", "bias")}
    try:
        shapes = _file_shapes(path)
        overlay: dict = dict(file=str(path))
        # NOTE: timm drops the file's classifier whenever num_classes differs from the
        # pretrained_cfg's (1000 for ImageNet models), even when the file's own head fits;
        # telling it the file's head size keeps a matching head and still adapts another.
        head_shape = shapes.get(f"{classifiers[0]}.weight") if classifiers else None
        if head_shape:
            overlay["num_classes"] = head_shape[0]
        with _quiet("timm.models"):  # our one line below says what loaded; timm's three say it again
            model = timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, OSError, KeyError, ValueError, SafetensorError) as err:
        raise ModelError(f"{KEY}: {path} does not fit {cfg.name}: {str(err).splitlines()[0]}") from None
    # NOTE: when it adapts a classifier timm loads with strict=False, so a file of another
    # architecture would load nothing and leave a silently random model; check the names.
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - shapes.keys() - heads), sorted(shapes.keys() - expected - heads)
    if missing or unexpected:
        counts = f"{len(missing)} weights missing (e.g. {missing[:3]}), {len(unexpected)} unexpected"
        counts += f" (e.g. {unexpected[:3]})"
        raise ModelError(f"{KEY}: {path} does not fit {cfg.name}: {counts}")
    if head_shape and head_shape[0] != num_classes:
        # NOTE: a warning, not info: part of the model starts random, and `trainer train` builds the
        # model before its logging is set up, when only warnings reach stderr
        log.warning(
            "%s: %s has a %d-class head; %s re-initialised for %d classes",
            KEY,
            source.described,
            head_shape[0],
            " and ".join(classifiers),
            num_classes,
        )
    else:
        log.info("%s: all weights from %s", KEY, source.described)
    return model


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Only warnings from `logger_name` while inside."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _classifier_names(model_name: str) -> tuple[str, ...]:
    """The classifier module names timm adapts for this model, e.g. ('fc',)."""
    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    classifier = pretrained_cfg.classifier if pretrained_cfg else None
    if not classifier:
        return ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes in a weights file, named as timm's loader names them."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    else:
        shapes = {key: tuple(value.shape) for key, value in timm.models.load_state_dict(str(path)).items()}
    # As timm's clean_state_dict: a DistributedDataParallel save prefixes `module.`.
    return {key.removeprefix("module."): shape for key, shape in shapes.items()}
