"""Reading the run configuration: YAML file, then `key.sub=value` overrides, then checks.

Precedence is command line > YAML file > defaults. Unknown keys, wrong types and impossible
values raise `ConfigError`, whose message names the key and the file it came from; a key
that moved to another section names its new place.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from trainer.config.sections import SECTIONS, Config
from trainer.data.resize import schedule_problem
from trainer.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float.

    NOTE: PyYAML follows YAML 1.1, where a float needs a dot (`1.0e-4`), so `1e-4` -- the
    usual way to write a weight decay or lr -- would load as a string and be rejected.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# NOTE: the 39-key `data` section was split by concern (0.3): where the images are (`data`),
# how they are batched and loaded (`loader`), the model's input (`input`) and train-time
# augmentation (`aug`). An old key stops with one line naming its new place.
_MOVED_TO = {
    "loader": (
        "batch_size_per_device",
        "val_batch_size_per_device",
        "workers",
        "prefetch_factor",
        "persistent_workers",
        "pin_memory",
        "normalize_on_device",
        "draft_decode",
    ),
    "input": ("img_size", "test_img_size", "crop_pct", "interpolation", "mean", "std", "train_size_schedule"),
    "aug": (
        "scale",
        "ratio",
        "hflip",
        "color_jitter",
        "auto_augment",
        "re_prob",
        "re_mode",
        "re_count",
        "repeated_aug",
    ),
}
MOVED_KEYS = {f"data.{name}": f"{section}.{name}" for section, names in _MOVED_TO.items() for name in names}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation; return it converted where lossless."""
    if isinstance(annotation, types.UnionType):  # `X | None`
        if value is None:
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. run_name: 2024
    elif annotation is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):  # `output.log_with=tensorboard` or `a,b`
            return [_load_yaml(v) for v in value.split(",")] if value else []
    else:
        raise TypeError(f"unsupported config annotation {annotation!r}")
    raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")


def _set(cfg: Config, key: str, value: Any, origin: str) -> None:
    if key in MOVED_KEYS:
        raise ConfigError(f"{origin}: '{key}' has moved: write it as '{MOVED_KEYS[key]}'")
    section_name, _, name = key.partition(".")
    if section_name not in SECTIONS or not name:
        raise ConfigError(f"{origin}: unknown key '{key}' (sections: {', '.join(SECTIONS)})")
    section = getattr(cfg, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if name not in fields:
        raise ConfigError(f"{origin}: unknown key '{key}' (known in {section_name}: {', '.join(fields)})")
    hints = typing.get_type_hints(type(section))
    value = _coerce(value, hints[name], f"{origin}: {key}")
    choices = fields[name].metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{origin}: {key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
    setattr(section, name, value)


_FLOAT32_MAX = 3.4028234663852886e38


def _map_deprecated(cfg: Config, origins: dict[str, str]) -> None:
    """Move a deprecated key's value to the key that replaced it, with one warning line."""
    m = cfg.model
    if not m.pretrained_file:
        return
    where = origins.get("model.pretrained_file", cfg.source)
    if m.pretrained:
        raise ConfigError(f"{where}: model.pretrained_file is a deprecated alias of model.pretrained; set only that")
    log = logging.getLogger("trainer")
    log.warning("%s: model.pretrained_file is deprecated; read as model.pretrained=%s", where, m.pretrained_file)
    # NOTE: cleared, so the saved config.yaml holds the one key and loads back equal
    m.pretrained, m.pretrained_file = m.pretrained_file, ""


def _validate(cfg: Config, origins: dict[str, str]) -> None:
    """Reject values no run could use; each message names the key and where its value came from."""
    d, ld, inp, aug = cfg.data, cfg.loader, cfg.input, cfg.aug
    o, s, t = cfg.optim, cfg.schedule, cfg.train
    checks = [
        ("loader.batch_size_per_device", ld.batch_size_per_device > 0, "must be > 0"),
        ("loader.val_batch_size_per_device", ld.val_batch_size_per_device >= 0, "must be >= 0"),
        ("loader.global_batch_size", ld.global_batch_size >= 0, "must be >= 0"),
        ("loader.workers", ld.workers >= 0, "must be >= 0"),
        ("loader.prefetch_factor", ld.prefetch_factor > 0, "must be > 0"),
        ("input.img_size", inp.img_size >= 0, "must be >= 0"),
        ("input.crop_pct", 0.0 <= inp.crop_pct <= 1.0, "must be in (0, 1], or 0 for timm's default"),
        ("input.mean", len(inp.mean) in (0, 3), "must have 3 values (RGB) or be empty"),
        (
            "input.std",
            len(inp.std) in (0, 3) and all(v > 0 for v in inp.std),
            "must have 3 positive values or be empty",
        ),
        (
            "aug.scale",
            len(aug.scale) == 2 and 0 < aug.scale[0] <= aug.scale[1] <= 1,
            "must be [min, max] with 0 < min <= max <= 1",
        ),
        (
            "aug.ratio",
            len(aug.ratio) == 2 and 0 < aug.ratio[0] <= aug.ratio[1],
            "must be [min, max] with 0 < min <= max",
        ),
        ("aug.hflip", 0.0 <= aug.hflip <= 1.0, "must be a probability in [0, 1]"),
        ("data.max_train_samples", d.max_train_samples >= 0, "must be >= 0"),
        ("data.max_val_samples", d.max_val_samples >= 0, "must be >= 0"),
        ("data.index_wait_s", d.index_wait_s > 0, "must be > 0"),
        ("model.num_classes", cfg.model.num_classes >= 0, "must be >= 0"),
        # NOTE: the optimizers scale by lr and weight decay in float32: a larger value is a
        # RuntimeError ("cannot be converted to type float without overflow") at step 1.
        ("optim.lr", 0 < o.lr <= _FLOAT32_MAX, f"must be > 0 and at most {_FLOAT32_MAX:.4g} (float32)"),
        (
            "optim.weight_decay",
            0 <= o.weight_decay <= _FLOAT32_MAX,
            f"must be >= 0 and at most {_FLOAT32_MAX:.4g} (float32)",
        ),
        ("optim.momentum", 0 <= o.momentum < 1, "must be in [0, 1)"),
        ("optim.layer_decay", 0 <= o.layer_decay <= 1, "must be in (0, 1], or 0 to disable it"),
        ("train.epochs", t.epochs > 0, "must be > 0"),
        ("schedule.step_epochs", s.step_epochs > 0, "must be > 0"),
        ("schedule.gamma", 0 < s.gamma <= 1, "must be in (0, 1]"),
        ("schedule.warmup_epochs", 0 <= s.warmup_epochs < t.epochs, "must be >= 0 and less than train.epochs"),
        ("schedule.warmup_lr_ratio", 0 <= s.warmup_lr_ratio <= 1, "must be in [0, 1]"),
        ("schedule.min_lr_ratio", 0 <= s.min_lr_ratio <= 1, "must be in [0, 1]"),
        ("train.grad_accum_steps", t.grad_accum_steps >= 1, "must be >= 1"),
        ("train.label_smoothing", 0 <= t.label_smoothing < 1, "must be in [0, 1)"),
        ("train.checkpoint_every_steps", t.checkpoint_every_steps >= 0, "must be >= 0"),
        ("train.keep_last_checkpoints", t.keep_last_checkpoints >= 1, "must be >= 1"),
        ("train.eval_every_epochs", t.eval_every_epochs >= 1, "must be >= 1"),
        ("train.log_every_steps", t.log_every_steps >= 1, "must be >= 1"),
        ("train.max_steps_per_epoch", t.max_steps_per_epoch >= 0, "must be >= 0"),
        ("train.max_non_finite_steps", t.max_non_finite_steps >= 1, "must be >= 1"),
        ("backend.collective_timeout_s", cfg.backend.collective_timeout_s > 0, "must be > 0"),
        ("input.test_img_size", inp.test_img_size >= 0, "must be >= 0"),
        ("aug.re_prob", 0.0 <= aug.re_prob <= 1.0, "must be a probability in [0, 1]"),
        ("aug.re_count", aug.re_count >= 1, "must be >= 1"),
        ("aug.repeated_aug", aug.repeated_aug >= 0, "must be >= 0"),
        ("train.bce_target_threshold", 0 <= t.bce_target_threshold < 1, "must be in [0, 1)"),
        ("train.grad_clip_norm", 0 <= t.grad_clip_norm <= _FLOAT32_MAX, "must be >= 0"),
        ("mixup.mixup_alpha", cfg.mixup.mixup_alpha >= 0, "must be >= 0"),
        ("mixup.cutmix_alpha", cfg.mixup.cutmix_alpha >= 0, "must be >= 0"),
        ("mixup.prob", 0 <= cfg.mixup.prob <= 1, "must be a probability in [0, 1]"),
        ("mixup.switch_prob", 0 <= cfg.mixup.switch_prob <= 1, "must be a probability in [0, 1]"),
        ("ema.decay", 0 <= cfg.ema.decay < 1, "must be in [0, 1)"),
        ("ema.every_steps", cfg.ema.every_steps >= 1, "must be >= 1"),
        ("ema.warmup_power", cfg.ema.warmup_power > 0, "must be > 0"),
        ("data.root", bool(d.root), "must name the dataset (a folder, a parquet/save_to_disk dir or a hub id)"),
    ]
    checks.append(("input.train_size_schedule", not (problem := schedule_problem(inp.train_size_schedule)), problem))
    for key, ok, why in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(
                f"{origins.get(key, cfg.source)}: {key}: {why}, got {getattr(getattr(cfg, section), name)!r}"
            )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse `key.sub=value` strings; values are read as YAML scalars (0.1, true, null, [1, 2])."""
    overrides = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"command line: '{item}' is not of the form key.sub=value")
        try:
            overrides[key.strip()] = _load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            overrides[key.strip()] = raw
    return overrides


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Build a Config from defaults, then the YAML file, then command-line overrides.

    Args:
        path: YAML file with one mapping per section; None uses the defaults alone.
        overrides: `section.key=value` strings, applied last.

    Raises:
        ConfigError: for a missing or malformed file, unknown keys, wrong types or
            impossible values; the message names the file and the key.
    """
    cfg = Config(source=str(path) if path else "<defaults>")
    origins: dict[str, str] = {}  # key -> the file or "command line" that set it
    if path is not None:
        path = Path(path)
        try:
            raw = _load_yaml(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
        for section, values in raw.items():
            if section not in SECTIONS:
                raise ConfigError(f"{path}: unknown section '{section}' (sections: {', '.join(SECTIONS)})")
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping of keys")
            for key, value in values.items():
                _set(cfg, f"{section}.{key}", value, str(path))
                origins[f"{section}.{key}"] = str(path)
    for key, value in parse_overrides(overrides or []).items():
        _set(cfg, key, value, "command line")
        origins[key] = "command line"  # NOTE: so `train.epochs=0` is not blamed on the file
    _map_deprecated(cfg, origins)
    _validate(cfg, origins)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config; `load_config` reads it back to an equal Config."""
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
