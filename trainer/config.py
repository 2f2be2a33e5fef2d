"""Typed run configuration: one dataclass per YAML section, with `key.sub=value` overrides.

Precedence is command line > YAML file > defaults. Every field carries a one-line help text
(shown by `--help` and in the README's config reference) and, where it has a closed set of
values, its choices. Unknown keys, wrong types and impossible values raise `ConfigError`,
whose message names the key and the file it came from.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.backend import DEVICE_TYPES
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


def _field(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    name: str = _field("resnet50", "timm model name; any name `timm.list_models()` knows")
    num_classes: int = _field(0, "classifier outputs; 0 takes the number of classes in the training data")
    pretrained_file: str = _field("", "local weights file (.safetensors, .pth) to start from; nothing is downloaded")
    drop_rate: float = _field(0.0, "dropout before the classifier")
    drop_path_rate: float = _field(0.0, "stochastic depth rate, for models that support it")


@dataclass
class DataConfig:
    source: str = _field("folder", "where images come from (wds: WebDataset tar shards)", ("folder", "hf", "wds"))
    root: str = _field(
        "",
        "folder: ImageNet root with train/ and val/; hf: hub id in the local cache, parquet dir or save_to_disk dir; wds: folder of *-<split>-NNNN.tar shards",
    )
    create_if_missing: str = _field("", "write a built-in dataset into `root` when it does not exist", ("", "digits"))
    train_split: str = _field("train", "training split: sub-folder (folder) or split name (hf)")
    val_split: str = _field("", "validation split: sub-folder (folder) or split name (hf); empty: val (folder), validation (hf)")
    image_column: str = _field("image", "hf: column holding the image ({bytes, path} or a decoded image)")
    label_column: str = _field("label", "hf: column holding the integer class label")
    streaming: bool = _field(False, "hf, wds: stream rows (tar shards) in order instead of reading by index, sharded across processes")
    hf_cache_dir: str = _field("", "hf: datasets cache directory; empty uses HF_DATASETS_CACHE / the default")
    batch_size_per_device: int = _field(
        128,
        "images per device per micro-batch (global batch = this x processes x accumulation)",
    )
    global_batch_size: int = _field(
        0,
        "images per optimizer step, kept on any process count: the accumulation is derived "
        "(global / (batch_size_per_device x processes)); 0: batch_size_per_device x processes x train.grad_accum_steps",
    )
    val_batch_size_per_device: int = _field(0, "validation batch per device; 0 uses batch_size_per_device")
    workers: int = _field(4, "loader worker processes per device")
    prefetch_factor: int = _field(2, "batches each worker loads ahead")
    persistent_workers: bool = _field(True, "keep loader workers alive between epochs")
    pin_memory: bool = _field(True, "pin host batches for faster, asynchronous copies to an accelerator")
    img_size: int = _field(0, "train crop and val crop size; 0 takes the model's default from timm")
    crop_pct: float = _field(0.0, "val resize = img_size / crop_pct, then center crop; 0 takes timm's default")
    interpolation: str = _field("", "resize interpolation; empty takes timm's default", ("", "bilinear", "bicubic", "nearest"))
    mean: list = _field([], "normalization mean (RGB, 0-1 scale); empty takes timm's default")
    std: list = _field([], "normalization std (RGB, 0-1 scale); empty takes timm's default")
    scale: list = _field([0.08, 1.0], "RandomResizedCrop area range")
    ratio: list = _field([0.75, 1.3333333333333333], "RandomResizedCrop aspect ratio range")
    hflip: float = _field(0.5, "horizontal flip probability")
    color_jitter: float = _field(0.0, "color jitter strength; 0 disables it (the reference recipe has none)")
    auto_augment: str = _field("", "timm auto-augment policy such as rand-m9-mstd0.5; empty disables it")
    normalize_on_device: bool = _field(True, "ship uint8 batches and normalize on the device (4x fewer bytes to copy)")
    draft_decode: bool = _field(True, "decode large JPEGs at reduced scale when still at least img_size")
    on_error: str = _field("skip", "undecodable image: skip it (counted, listed in skipped.txt) or raise", ("skip", "raise"))
    max_train_samples: int = _field(0, "use only the first N training samples; 0 uses all")
    max_val_samples: int = _field(0, "use only the first N validation samples; 0 uses all")
    index_cache: str = _field(
        "",
        "folder, wds: where the file index is cached, built once per job by process 0: empty = beside the data if writable, else ~/.cache/trainer/index; a directory; or off (every process scans)",
    )
    index_wait_s: float = _field(600.0, "folder, wds: how long processes other than 0 wait for process 0's index file")
    val_labels: str = _field("", "folder: labels file of a flat val/*.JPEG (LOC_val_solution.csv or file,class CSV); empty: looked for in the root")
    test_img_size: int = _field(0, "val crop size when it differs from the train size (RSB A3: train 160, test 224); 0 uses img_size")
    re_prob: float = _field(0.0, "random erasing probability per image (timm RandomErasing, on the normalized batch); 0 disables it")
    re_mode: str = _field("pixel", "random erasing fill: per-pixel normal noise, per-channel noise, or zeros", ("pixel", "rand", "const"))
    re_count: int = _field(1, "random erasing: at most this many boxes per image")
    repeated_aug: int = _field(
        0, "repeated augmentation (timm RepeatAugSampler): each image this many times per epoch, differently augmented, epoch length kept; 0 or 1 disables it"
    )
    train_size_schedule: list = _field(
        [],
        "progressive resizing: [[epoch, px], ...], the train crop from each epoch on (epochs from 0, as in metrics.jsonl), e.g. [[0, 160], [12, 192]]; "
        "the val crop stays test_img_size or img_size; empty trains at img_size throughout",
    )


@dataclass
class OptimConfig:
    name: str = _field("sgd", "optimizer, by timm's create_optimizer_v2 name (sgd, momentum, adamw, lamb, ...)")
    lr: float = _field(0.1, "peak learning rate")
    momentum: float = _field(0.9, "SGD momentum")
    weight_decay: float = _field(1e-4, "weight decay")
    nesterov: bool = _field(False, "Nesterov momentum for SGD")
    implementation: str = _field(
        "auto",
        "optimizer step kernel; auto: torch's default, fused SGD with a loss scaler where the device runs it (no host sync per step)",
        ("auto", "foreach", "fused", "loop"),
    )
    no_decay_norm_bias: bool = _field(False, "no weight decay on normalization weights and biases (timm's filter_bias_and_bn), as the DLE and RSB recipes")


@dataclass
class ScheduleConfig:
    name: str = _field("step", "learning-rate schedule", ("step", "cosine", "constant"))
    step_epochs: int = _field(30, "step: multiply the lr by gamma every this many epochs")
    gamma: float = _field(0.1, "step: lr factor at each step")
    warmup_epochs: float = _field(0.0, "linear warmup from warmup_lr_ratio x lr to lr over this many epochs")
    warmup_lr_ratio: float = _field(0.0, "lr at the start of warmup, as a fraction of lr")
    min_lr_ratio: float = _field(0.0, "cosine: final lr as a fraction of lr")


@dataclass
class TrainConfig:
    epochs: int = _field(90, "training epochs")
    seed: int = _field(0, "seed for weights, data order and augmentation")
    precision: str = _field("auto", "auto: bf16 where supported, else fp16 on accelerators, else fp32", ("auto", "fp32", "fp16", "bf16"))
    channels_last: bool = _field(True, "NHWC memory format for conv nets (faster with AMP)")
    grad_accum_steps: int = _field(
        1,
        "micro-batches per optimizer step (derived instead when data.global_batch_size is set)",
    )
    label_smoothing: float = _field(0.0, "label smoothing for the cross-entropy loss")
    compile: bool = _field(False, "wrap the model in torch.compile")
    resume: str = _field("", "empty starts fresh; auto continues from the newest checkpoint; or a checkpoint path")
    checkpoint_every_steps: int = _field(0, "also save a checkpoint every N optimizer steps; 0 saves at epoch ends only")
    keep_last_checkpoints: int = _field(2, "checkpoints kept besides the best one")
    eval_every_epochs: int = _field(1, "validate every N epochs (and always after the last)")
    log_every_steps: int = _field(50, "read the loss and log a line every N optimizer steps")
    max_steps_per_epoch: int = _field(0, "stop each epoch after N optimizer steps; 0 runs the whole epoch")
    max_non_finite_steps: int = _field(10, "stop after this many consecutive non-finite losses (without a loss scaler)")
    loss: str = _field("ce", "training loss: cross-entropy, or binary cross-entropy per class (timm BinaryCrossEntropy, the RSB recipes)", ("ce", "bce"))
    bce_target_threshold: float = _field(0.0, "bce: targets at or above this become 1, below 0 (RSB: 0.2); 0 keeps soft targets")
    grad_clip_norm: float = _field(0.0, "clip the gradient's global L2 norm to this before each update (unscaled first under fp16); 0 disables it")


@dataclass
class MixupConfig:
    mixup_alpha: float = _field(0.0, "mixup Beta(alpha, alpha) parameter (timm Mixup); 0 disables mixup")
    cutmix_alpha: float = _field(0.0, "cutmix Beta(alpha, alpha) parameter; 0 disables cutmix")
    prob: float = _field(1.0, "probability of mixing a batch when mixup or cutmix is on")
    switch_prob: float = _field(0.5, "with both on: probability of cutmix instead of mixup")
    mode: str = _field("batch", "one draw per batch, per pair of images or per image", ("batch", "pair", "elem"))


@dataclass
class EmaConfig:
    enabled: bool = _field(False, "keep an exponential moving average of the weights (timm ModelEmaV3), validated and exported beside them")
    decay: float = _field(0.9998, "EMA decay per update")
    every_steps: int = _field(1, "update the EMA every N optimizer steps")
    warmup: bool = _field(False, "ramp the decay up from 0 as 1 - (1 + updates)^-warmup_power (timm's EMA warmup)")
    warmup_power: float = _field(0.75, "warmup: exponent of the decay ramp (3/4 for short runs, 2/3 for long ones)")


@dataclass
class BackendConfig:
    device: str = _field("auto", "device type; auto picks mlu, then cuda and the others, then cpu", ("auto", *DEVICE_TYPES))
    host_memory: str = _field(
        "auto",
        "retain: the C library keeps freed host memory for reuse (no page faults for each step's activations); "
        "release: its defaults; auto: retain when the model runs on the cpu",
        ("auto", "retain", "release"),
    )
    collective_timeout_s: float = _field(
        300.0,
        "seconds a collective (gradient all-reduce, barrier, ...) may wait for the other processes before every process stops with a line naming the wait",
    )


@dataclass
class OutputConfig:
    dir: str = _field("runs", "parent directory of run directories")
    run_name: str = _field("", "run directory name; empty uses the config file's name")
    log_with: list = _field([], "extra trackers through Accelerate: tensorboard, wandb, mlflow")
    progress: str = _field("auto", "progress display: a bar on a terminal, log lines otherwise", ("auto", "bar", "log"))
    plots: bool = _field(True, "write PNG curves to plots/ after every epoch")
    overwrite: bool = _field(
        False,
        "replace a run already in the run directory (its metrics, checkpoints and weights); without it such a run stops, unless train.resume continues it",
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    source: str = field(default="<defaults>", compare=False, repr=False)
    """The file this config was read from, for error messages and the default run name."""

    @property
    def run_dir(self) -> Path:
        name = self.output.run_name or Path(self.source).stem
        return Path(self.output.dir).expanduser() / name


SECTIONS: dict[str, type] = {name: hint for name, hint in typing.get_type_hints(Config).items() if name != "source"}


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


def _validate(cfg: Config, origins: dict[str, str]) -> None:
    """Reject values no run could use; each message names the key and where its value came from."""
    d, o, s, t = cfg.data, cfg.optim, cfg.schedule, cfg.train
    checks = [
        ("data.batch_size_per_device", d.batch_size_per_device > 0, "must be > 0"),
        ("data.global_batch_size", d.global_batch_size >= 0, "must be >= 0"),
        ("data.val_batch_size_per_device", d.val_batch_size_per_device >= 0, "must be >= 0"),
        ("data.workers", d.workers >= 0, "must be >= 0"),
        ("data.prefetch_factor", d.prefetch_factor > 0, "must be > 0"),
        ("data.img_size", d.img_size >= 0, "must be >= 0"),
        ("data.crop_pct", 0.0 <= d.crop_pct <= 1.0, "must be in (0, 1], or 0 for timm's default"),
        ("data.mean", len(d.mean) in (0, 3), "must have 3 values (RGB) or be empty"),
        ("data.std", len(d.std) in (0, 3) and all(v > 0 for v in d.std), "must have 3 positive values or be empty"),
        ("data.scale", len(d.scale) == 2 and 0 < d.scale[0] <= d.scale[1] <= 1, "must be [min, max] with 0 < min <= max <= 1"),
        ("data.ratio", len(d.ratio) == 2 and 0 < d.ratio[0] <= d.ratio[1], "must be [min, max] with 0 < min <= max"),
        ("data.hflip", 0.0 <= d.hflip <= 1.0, "must be a probability in [0, 1]"),
        ("data.max_train_samples", d.max_train_samples >= 0, "must be >= 0"),
        ("data.max_val_samples", d.max_val_samples >= 0, "must be >= 0"),
        ("data.index_wait_s", d.index_wait_s > 0, "must be > 0"),
        ("model.num_classes", cfg.model.num_classes >= 0, "must be >= 0"),
        # NOTE: the optimizers scale by lr and weight decay in float32: a larger value is a
        # RuntimeError ("cannot be converted to type float without overflow") at step 1.
        ("optim.lr", 0 < o.lr <= _FLOAT32_MAX, f"must be > 0 and at most {_FLOAT32_MAX:.4g} (float32)"),
        ("optim.weight_decay", 0 <= o.weight_decay <= _FLOAT32_MAX, f"must be >= 0 and at most {_FLOAT32_MAX:.4g} (float32)"),
        ("optim.momentum", 0 <= o.momentum < 1, "must be in [0, 1)"),
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
        ("data.test_img_size", d.test_img_size >= 0, "must be >= 0"),
        ("data.re_prob", 0.0 <= d.re_prob <= 1.0, "must be a probability in [0, 1]"),
        ("data.re_count", d.re_count >= 1, "must be >= 1"),
        ("data.repeated_aug", d.repeated_aug >= 0, "must be >= 0"),
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
    checks.append(("data.train_size_schedule", not (problem := schedule_problem(d.train_size_schedule)), problem))
    for key, ok, why in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"{origins.get(key, cfg.source)}: {key}: {why}, got {getattr(getattr(cfg, section), name)!r}")


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
    _validate(cfg, origins)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config; `load_config` reads it back to an equal Config."""
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def describe_sections() -> str:
    """One line per field, by section: the text of `--help` and the README's reference."""
    lines = []
    for name, section_type in SECTIONS.items():
        lines.append(f"{name}:")
        for f in dataclasses.fields(section_type):
            default = _default(f)
            shown = [c or '""' for c in f.metadata["choices"]]
            choices = f" [{'|'.join(shown)}]" if shown else ""
            lines.append(f"  {name}.{f.name} = {default!r}{choices}: {f.metadata['help']}")
    return "\n".join(lines)


def reference_markdown() -> str:
    """The README's config reference, generated so it cannot drift from the code."""
    lines = []
    for name, section_type in SECTIONS.items():
        lines += [f"**{name}**", "", "| key | default | description |", "| --- | --- | --- |"]
        for f in dataclasses.fields(section_type):
            default = _default(f)
            choices = f" One of: {', '.join(repr(c) for c in f.metadata['choices'])}." if f.metadata["choices"] else ""
            lines.append(f"| `{name}.{f.name}` | `{default!r}` | {f.metadata['help'].replace('|', '/')}.{choices} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
