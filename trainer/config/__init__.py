"""Typed run configuration: one dataclass per YAML section, with `key.sub=value` overrides.

`sections` defines the sections and their keys, `load` reads a YAML file and overrides into
a checked `Config`, `reference` renders the keys for `--help` and docs/config.md.
"""

from trainer.config.load import MOVED_KEYS, config_to_dict, load_config, parse_overrides, save_config
from trainer.config.reference import describe_sections, reference_markdown
from trainer.config.sections import (
    SECTIONS,
    AugConfig,
    BackendConfig,
    Config,
    DataConfig,
    EmaConfig,
    InputConfig,
    LoaderConfig,
    MixupConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    ScheduleConfig,
    TrainConfig,
)
from trainer.errors import ConfigError

__all__ = [
    "MOVED_KEYS",
    "SECTIONS",
    "AugConfig",
    "BackendConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EmaConfig",
    "InputConfig",
    "LoaderConfig",
    "MixupConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "ScheduleConfig",
    "TrainConfig",
    "config_to_dict",
    "describe_sections",
    "load_config",
    "parse_overrides",
    "reference_markdown",
    "save_config",
]
