"""Every YAML under configs/ loads; the ResNet50 recipe is the migration guide's, checked through real objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, RandomHorizontalFlip, Resize

from trainer.config import Config, load_config, save_config
from trainer.data.loader import create_transforms, resolve_input_config
from trainer.optim import create_optimizer, lr_factor

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ACCELERATE = CONFIGS / "accelerate"
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if ACCELERATE not in p.parents)
ACCELERATE_CONFIGS = sorted(ACCELERATE.glob("*.yaml"))
RECIPE = CONFIGS / "resnet50_imagenet.yaml"

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_there_are_configs_to_check():
    assert RECIPE in RUN_CONFIGS and CONFIGS / "demo.yaml" in RUN_CONFIGS
    assert ACCELERATE_CONFIGS, f"no Accelerate launch configs in {ACCELERATE}"


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_run_config_loads(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.source == str(path)
    saved = tmp_path / "resolved.yaml"
    save_config(cfg, saved)
    assert load_config(saved) == cfg
    # Each key in the file was read, not silently dropped: the loaded value equals the file's.
    for section, values in yaml.safe_load(path.read_text()).items():
        for key, value in values.items():
            loaded = getattr(getattr(cfg, section), key)
            assert loaded == value or loaded == pytest.approx(value), f"{section}.{key}"


@pytest.fixture(scope="module")
def recipe() -> Config:
    return load_config(RECIPE)


def test_recipe_model_batch_epochs_and_workers(recipe):
    assert recipe.model.name == "resnet50" and recipe.model.pretrained_file == ""
    assert recipe.data.source == "folder"
    assert recipe.loader.batch_size_per_device == 128
    assert recipe.loader.val_batch_size_per_device in (0, 128)
    assert recipe.loader.workers == 40
    assert recipe.train.epochs == 90
    assert recipe.train.grad_accum_steps == 1 and recipe.train.label_smoothing == 0.0
    assert recipe.train.precision == "fp32"
    assert recipe.aug.color_jitter == 0.0 and recipe.aug.auto_augment == ""


def test_recipe_optimizer_is_plain_sgd(recipe):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = create_optimizer(model, recipe.optim)
    assert type(optimizer) is torch.optim.SGD
    assert len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.1
    assert group["momentum"] == 0.9
    assert group["weight_decay"] == 1e-4
    assert group["nesterov"] is False
    assert group["dampening"] == 0
    assert len(group["params"]) == len(list(model.parameters()))  # decay on every parameter, as the guide


def test_recipe_schedule_is_x01_every_30_epochs(recipe):
    steps = 7
    at = lambda epoch: lr_factor(epoch * steps, recipe.schedule, steps, recipe.train.epochs)  # noqa: E731
    assert [at(e) for e in (0, 29)] == [1.0, 1.0]
    assert at(30) == pytest.approx(0.1) and at(59) == pytest.approx(0.1)
    assert at(60) == pytest.approx(0.01) and at(89) == pytest.approx(0.01)
    assert recipe.schedule.warmup_epochs == 0


@pytest.fixture(scope="module")
def input_cfg(recipe) -> dict:
    return resolve_input_config(recipe.input, recipe.model.name)


def recipe_transforms(recipe, input_cfg) -> tuple:
    return create_transforms(
        aug=recipe.aug,
        input_cfg=input_cfg,
        test_img_size=recipe.input.test_img_size,
        normalize_on_device=recipe.loader.normalize_on_device,
    )


def test_recipe_input_config(input_cfg):
    assert input_cfg["input_size"] == (3, 224, 224)
    assert input_cfg["crop_pct"] == 0.875
    assert input_cfg["interpolation"] == "bilinear"
    assert tuple(input_cfg["mean"]) == IMAGENET_MEAN and tuple(input_cfg["std"]) == IMAGENET_STD


def test_recipe_train_transform_is_random_resized_crop_224_and_flip(recipe, input_cfg):
    train, _ = recipe_transforms(recipe, input_cfg)
    steps = list(train.transforms)
    crop = steps[0]
    assert type(crop).__name__ == "RandomResizedCropAndInterpolation"
    assert tuple(crop.size) == (224, 224)
    assert tuple(crop.scale) == (0.08, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == InterpolationMode.BILINEAR
    flips = [t for t in steps if isinstance(t, RandomHorizontalFlip)]
    assert len(flips) == 1 and flips[0].p == 0.5
    names = [type(t).__name__ for t in steps]
    assert not any("Jitter" in n or "Augment" in n or "Erasing" in n for n in names), names
    assert names[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]


def test_recipe_val_transform_is_resize_256_then_center_crop_224(recipe, input_cfg):
    _, val = recipe_transforms(recipe, input_cfg)
    steps = list(val.transforms)
    resize, crop = steps[0], steps[1]
    assert isinstance(resize, Resize) and resize.size in (256, [256])  # shorter side to 256
    assert resize.interpolation == InterpolationMode.BILINEAR
    assert isinstance(crop, CenterCrop) and tuple(crop.size) == (224, 224)


def test_recipe_normalization_is_imagenet_mean_std(recipe, input_cfg):
    # The trainer normalizes on the device by default: the host transform ends in uint8.
    train, val = recipe_transforms(recipe, input_cfg)
    assert not any(isinstance(t, Normalize) for t in list(train.transforms) + list(val.transforms))
    from PIL import Image

    out = val(Image.new("RGB", (300, 400), (10, 200, 30)))
    assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)
    # With host normalization the same transforms carry ImageNet mean/std.
    recipe.loader.normalize_on_device = False
    try:
        for transform in recipe_transforms(recipe, input_cfg):
            (normalize,) = [t for t in transform.transforms if isinstance(t, Normalize)]
            assert tuple(torch.as_tensor(normalize.mean).tolist()) == pytest.approx(IMAGENET_MEAN)
            assert tuple(torch.as_tensor(normalize.std).tolist()) == pytest.approx(IMAGENET_STD)
    finally:
        recipe.loader.normalize_on_device = True


# --- Accelerate launch configs (Accelerate's format, not ours) ----------------------------


ACCELERATE_KEYS = (
    "compute_environment",
    "distributed_type",
    "num_processes",
    "num_machines",
    "machine_rank",
    "mixed_precision",
    "use_cpu",
)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_launch_config_is_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict)
    missing = [k for k in ACCELERATE_KEYS if k not in raw]
    assert not missing, f"{path.name} lacks {missing}"
    assert raw["compute_environment"] == "LOCAL_MACHINE"
    assert raw["mixed_precision"] == "no"  # train.precision decides, not Accelerate
    # Accelerate's own reader: rejects unknown keys and bad enum values.
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    distributed = DistributedType(cfg.distributed_type)
    assert cfg.num_processes >= 1 and cfg.num_machines >= 1 and 0 <= cfg.machine_rank < cfg.num_machines
    assert cfg.num_processes % cfg.num_machines == 0
    if distributed == DistributedType.NO:
        assert cfg.num_processes == 1 and cfg.num_machines == 1
    else:
        assert cfg.num_processes > 1
    if cfg.num_machines > 1:
        assert cfg.main_process_ip and cfg.main_process_port
    # CPU configs run on the CPU; cpu_2proc says MULTI_GPU only to get the torchrun launcher.
    assert cfg.use_cpu is ("cpu" in path.name)
    if "cpu" in path.name and cfg.num_processes > 1:
        assert distributed == DistributedType.MULTI_GPU, "MULTI_CPU would launch one process without mpirun"


# --- Modern recipes: DLE 90 epochs and RSB A3 -----------------------------------------------

MODERN = [CONFIGS / "resnet50_dle.yaml", CONFIGS / "resnet50_rsb_a3.yaml"]


def test_dle_recipe_is_nvidias():
    cfg = load_config(CONFIGS / "resnet50_dle.yaml")
    o, s, t = cfg.optim, cfg.schedule, cfg.train
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.no_decay_norm_bias) == ("sgd", 2.048, 0.875, 1 / 32768, True)
    assert o.lr == pytest.approx(0.256 * cfg.loader.global_batch_size / 256) and cfg.loader.global_batch_size == 2048
    assert (s.name, s.warmup_epochs, t.epochs, t.label_smoothing, t.precision) == ("cosine", 8, 90, 0.1, "fp16")
    assert cfg.mixup.mixup_alpha == 0 and not cfg.ema.enabled and t.loss == "ce"


def test_rsb_a3_recipe_is_the_papers():
    cfg = load_config(CONFIGS / "resnet50_rsb_a3.yaml")
    i, a, o, t = cfg.input, cfg.aug, cfg.optim, cfg.train
    assert (i.img_size, i.test_img_size, i.crop_pct, i.interpolation) == (160, 224, 0.95, "bicubic")
    assert (a.auto_augment, a.re_prob, a.repeated_aug) == ("rand-m6-mstd0.5-inc1", 0.0, 0)
    assert (o.name, o.lr, o.weight_decay, o.no_decay_norm_bias) == ("lamb", 8e-3, 0.02, True)
    assert cfg.loader.global_batch_size == 2048 == 8 * cfg.loader.batch_size_per_device
    assert (cfg.schedule.name, cfg.schedule.warmup_epochs, t.epochs) == ("cosine", 5, 100)
    assert (t.loss, t.bce_target_threshold, t.label_smoothing, t.grad_clip_norm) == ("bce", 0.2, 0.0, 0.0)
    assert (cfg.mixup.mixup_alpha, cfg.mixup.cutmix_alpha) == (0.1, 1.0) and not cfg.ema.enabled


@pytest.mark.parametrize("path", MODERN, ids=lambda p: p.name)
def test_modern_recipe_header_names_source_top1_batch_and_lr_scaling(path):
    header = path.read_text().split("\nmodel:")[0].lower()
    for words in ("source:", "published top-1", "global batch", "lr ="):
        assert words in header, (path.name, words)


@pytest.mark.parametrize("path", MODERN, ids=lambda p: p.name)
def test_modern_recipe_trains_two_steps_on_tiny_data(path, tmp_path):
    import helpers
    from trainer.train import Trainer

    root = helpers.make_image_folder(tmp_path / "imagenet")
    overrides = [
        f"data.root={root}",
        "model.name=test_resnet",
        "input.img_size=32",
        "loader.batch_size_per_device=4",
        "loader.global_batch_size=0",  # the recipe's 2048 would be 512 micro-batches of 4 here
        "loader.workers=0",
        "train.precision=fp32",
        "train.max_steps_per_epoch=2",
        f"output.dir={tmp_path / 'runs'}",
        "output.plots=false",
    ]
    if load_config(path).input.test_img_size:
        overrides.append("input.test_img_size=40")
    trainer = Trainer(load_config(path, overrides))
    try:
        trainer.run.prepare()
        before = [p.detach().clone() for p in trainer.model.parameters()]
        record = trainer.train_epoch(0)
        assert trainer.state.global_step == 2 and record["train_samples"] == 8
        assert torch.isfinite(torch.tensor(record["train_loss"]))
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
        assert trainer.evaluate()["val_samples"] == 9
    finally:
        trainer.close()
