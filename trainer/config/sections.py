"""The run configuration's sections: one dataclass per YAML section, one concern each.

Every field carries a one-line help text (shown by `--help` and in the generated config
reference) and, where it has a closed set of values, its choices.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.backend import DEVICE_TYPES


def _field(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    name: str = _field("resnet50", "timm model name; any name `timm.list_models()` knows")
    num_classes: int = _field(0, "classifier outputs; 0 takes the number of classes in the training data")
    pretrained: str = _field(
        "",
        "weights to start from: a model folder (local-dir:PATH or PATH), a run directory, a checkpoint, a weights file "
        "(.safetensors, .pth) or a hub id already in the local hub cache; nothing is downloaded (docs/models.md)",
    )
    pretrained_file: str = _field("", "deprecated: an alias of model.pretrained, mapped to it with a warning")
    drop_rate: float = _field(0.0, "dropout before the classifier")
    drop_path_rate: float = _field(0.0, "stochastic depth rate, for models that support it")


@dataclass
class DataConfig:
    """Where the images are and how they are read: the source, its splits and columns, the index cache."""

    source: str = _field("folder", "where images come from (wds: WebDataset tar shards)", ("folder", "hf", "wds"))
    root: str = _field(
        "",
        "folder: ImageNet root with train/ and val/; hf: hub id in the "
        "local cache, parquet dir or save_to_disk dir; wds: folder of "
        "*-<split>-NNNN.tar shards",
    )
    create_if_missing: str = _field("", "write a built-in dataset into `root` when it does not exist", ("", "digits"))
    train_split: str = _field("train", "training split: sub-folder (folder) or split name (hf)")
    val_split: str = _field(
        "", "validation split: sub-folder (folder) or split name (hf); empty: val (folder), validation (hf)"
    )
    image_column: str = _field("image", "hf: column holding the image ({bytes, path} or a decoded image)")
    label_column: str = _field("label", "hf: column holding the integer class label")
    streaming: bool = _field(
        False, "hf, wds: stream rows (tar shards) in order instead of reading by index, sharded across processes"
    )
    hf_cache_dir: str = _field("", "hf: datasets cache directory; empty uses HF_DATASETS_CACHE / the default")
    on_error: str = _field(
        "skip", "undecodable image: skip it (counted, listed in skipped.txt) or raise", ("skip", "raise")
    )
    max_train_samples: int = _field(0, "use only the first N training samples; 0 uses all")
    max_val_samples: int = _field(0, "use only the first N validation samples; 0 uses all")
    index_cache: str = _field(
        "",
        "folder, wds: where the file index is cached, built once per job "
        "by process 0: empty = beside the data if writable, else "
        "~/.cache/trainer/index; a directory; or off (every process "
        "scans)",
    )
    index_wait_s: float = _field(600.0, "folder, wds: how long processes other than 0 wait for process 0's index file")
    val_labels: str = _field(
        "",
        "folder: labels file of a flat val/*.JPEG (LOC_val_solution.csv "
        "or file,class CSV); empty: looked for in the root",
    )


@dataclass
class LoaderConfig:
    """Batching and loader workers: how images reach the device."""

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
    normalize_on_device: bool = _field(True, "ship uint8 batches and normalize on the device (4x fewer bytes to copy)")
    draft_decode: bool = _field(True, "decode large JPEGs at reduced scale when still at least img_size")


@dataclass
class InputConfig:
    """The model's input: crop size by epoch, val resize and crop, normalization (timm's data config)."""

    img_size: int = _field(0, "train crop and val crop size; 0 takes the model's default from timm")
    test_img_size: int = _field(
        0, "val crop size when it differs from the train size (RSB A3: train 160, test 224); 0 uses img_size"
    )
    crop_pct: float = _field(0.0, "val resize = img_size / crop_pct, then center crop; 0 takes timm's default")
    interpolation: str = _field(
        "", "resize interpolation; empty takes timm's default", ("", "bilinear", "bicubic", "nearest")
    )
    mean: list = _field([], "normalization mean (RGB, 0-1 scale); empty takes timm's default")
    std: list = _field([], "normalization std (RGB, 0-1 scale); empty takes timm's default")
    train_size_schedule: list = _field(
        [],
        "progressive resizing: [[epoch, px], ...], the train crop from "
        "each epoch on (epochs from 0, as in metrics.jsonl), e.g. [[0, "
        "160], [12, 192]]; "
        "the val crop stays test_img_size or img_size; empty trains at img_size throughout",
    )


@dataclass
class AugConfig:
    """Train-time augmentation of single images (batch mixing is in `mixup`)."""

    scale: list = _field([0.08, 1.0], "RandomResizedCrop area range")
    ratio: list = _field([0.75, 1.3333333333333333], "RandomResizedCrop aspect ratio range")
    hflip: float = _field(0.5, "horizontal flip probability")
    color_jitter: float = _field(0.0, "color jitter strength; 0 disables it (the reference recipe has none)")
    auto_augment: str = _field("", "timm auto-augment policy such as rand-m9-mstd0.5; empty disables it")
    re_prob: float = _field(
        0.0, "random erasing probability per image (timm RandomErasing, on the normalized batch); 0 disables it"
    )
    re_mode: str = _field(
        "pixel", "random erasing fill: per-pixel normal noise, per-channel noise, or zeros", ("pixel", "rand", "const")
    )
    re_count: int = _field(1, "random erasing: at most this many boxes per image")
    repeated_aug: int = _field(
        0,
        "repeated augmentation (timm RepeatAugSampler): each image this "
        "many times per epoch, differently augmented, epoch length kept; "
        "0 or 1 disables it",
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
        "optimizer step kernel; auto: torch's default, fused SGD with a "
        "loss scaler where the device runs it (no host sync per step)",
        ("auto", "foreach", "fused", "loop"),
    )
    no_decay_norm_bias: bool = _field(
        False,
        "no weight decay on normalization weights and biases (timm's filter_bias_and_bn), as the DLE and RSB recipes",
    )
    layer_decay: float = _field(
        0.0,
        "layer-wise lr decay for fine-tuning (timm's): a block's lr is lr x layer_decay^(blocks above it); "
        "norm weights and biases get no weight decay; 0 disables it",
    )


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
    precision: str = _field(
        "auto", "auto: bf16 where supported, else fp16 on accelerators, else fp32", ("auto", "fp32", "fp16", "bf16")
    )
    channels_last: bool = _field(True, "NHWC memory format for conv nets (faster with AMP)")
    grad_accum_steps: int = _field(
        1,
        "micro-batches per optimizer step (derived instead when loader.global_batch_size is set)",
    )
    label_smoothing: float = _field(0.0, "label smoothing for the cross-entropy loss")
    compile: bool = _field(False, "wrap the model in torch.compile")
    resume: str = _field("", "empty starts fresh; auto continues from the newest checkpoint; or a checkpoint path")
    checkpoint_every_steps: int = _field(
        0, "also save a checkpoint every N optimizer steps; 0 saves at epoch ends only"
    )
    keep_last_checkpoints: int = _field(2, "checkpoints kept besides the best one")
    eval_every_epochs: int = _field(1, "validate every N epochs (and always after the last)")
    log_every_steps: int = _field(50, "read the loss and log a line every N optimizer steps")
    max_steps_per_epoch: int = _field(0, "stop each epoch after N optimizer steps; 0 runs the whole epoch")
    max_non_finite_steps: int = _field(10, "stop after this many consecutive non-finite losses (without a loss scaler)")
    loss: str = _field(
        "ce",
        "training loss: cross-entropy, or binary cross-entropy per class (timm BinaryCrossEntropy, the RSB recipes)",
        ("ce", "bce"),
    )
    bce_target_threshold: float = _field(
        0.0, "bce: targets at or above this become 1, below 0 (RSB: 0.2); 0 keeps soft targets"
    )
    grad_clip_norm: float = _field(
        0.0, "clip the gradient's global L2 norm to this before each update (unscaled first under fp16); 0 disables it"
    )


@dataclass
class MixupConfig:
    mixup_alpha: float = _field(0.0, "mixup Beta(alpha, alpha) parameter (timm Mixup); 0 disables mixup")
    cutmix_alpha: float = _field(0.0, "cutmix Beta(alpha, alpha) parameter; 0 disables cutmix")
    prob: float = _field(1.0, "probability of mixing a batch when mixup or cutmix is on")
    switch_prob: float = _field(0.5, "with both on: probability of cutmix instead of mixup")
    mode: str = _field("batch", "one draw per batch, per pair of images or per image", ("batch", "pair", "elem"))


@dataclass
class EmaConfig:
    enabled: bool = _field(
        False, "keep an exponential moving average of the weights (timm ModelEmaV3), validated and exported beside them"
    )
    decay: float = _field(0.9998, "EMA decay per update")
    every_steps: int = _field(1, "update the EMA every N optimizer steps")
    warmup: bool = _field(False, "ramp the decay up from 0 as 1 - (1 + updates)^-warmup_power (timm's EMA warmup)")
    warmup_power: float = _field(0.75, "warmup: exponent of the decay ramp (3/4 for short runs, 2/3 for long ones)")


@dataclass
class BackendConfig:
    device: str = _field(
        "auto", "device type; auto picks mlu, then cuda and the others, then cpu", ("auto", *DEVICE_TYPES)
    )
    host_memory: str = _field(
        "auto",
        "retain: the C library keeps freed host memory for reuse (no page faults for each step's activations); "
        "release: its defaults; auto: retain when the model runs on the cpu",
        ("auto", "retain", "release"),
    )
    collective_timeout_s: float = _field(
        300.0,
        "seconds a collective (gradient all-reduce, barrier, ...) may "
        "wait for the other processes before every process stops with a "
        "line naming the wait",
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
        "replace a run already in the run directory (its metrics, "
        "checkpoints and weights); without it such a run stops, unless "
        "train.resume continues it",
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    input: InputConfig = field(default_factory=InputConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    source: str = field(default="<defaults>", compare=False, repr=False)
    """The file this config was read from, for error messages and the default run name."""

    def data_sections(self) -> dict[str, Any]:
        """The four sections the input pipeline takes, as keyword arguments (`create_datasets(**...)`)."""
        return {"data": self.data, **self.pipeline_sections()}

    def pipeline_sections(self) -> dict[str, Any]:
        """The three sections the loaders take, as keyword arguments (`create_pipeline(data, **...)`)."""
        return {"loader": self.loader, "input": self.input, "aug": self.aug}

    @property
    def run_dir(self) -> Path:
        name = self.output.run_name or Path(self.source).stem
        return Path(self.output.dir).expanduser() / name


SECTIONS: dict[str, type] = {name: hint for name, hint in typing.get_type_hints(Config).items() if name != "source"}
