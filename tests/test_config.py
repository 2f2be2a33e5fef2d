"""Tests for trainer.config: defaults, YAML < command line, overrides, errors naming key and file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from trainer.config import (
    SECTIONS,
    Config,
    ConfigError,
    LoaderConfig,
    describe_sections,
    load_config,
    parse_overrides,
    save_config,
)

ROOT = ["data.root=/data/x"]  # the one key without a usable default


def write_yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- defaults and precedence -------------------------------------------------------------


def test_defaults_are_the_reference_recipe():
    cfg = load_config(None, ROOT)
    assert cfg.model.name == "resnet50" and cfg.model.num_classes == 0
    assert cfg.data.source == "folder" and cfg.loader.batch_size_per_device == 128
    assert cfg.aug.scale == [0.08, 1.0] and cfg.aug.hflip == 0.5 and cfg.data.on_error == "skip"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.nesterov) == (
        "sgd",
        0.1,
        0.9,
        1e-4,
        False,
    )
    assert (cfg.schedule.name, cfg.schedule.step_epochs, cfg.schedule.gamma) == ("step", 30, 0.1)
    assert cfg.train.epochs == 90 and cfg.train.keep_last_checkpoints == 2
    assert cfg.source == "<defaults>"


def test_defaults_do_not_share_lists_between_configs():
    a, b = Config(), Config()
    a.aug.scale.append(5.0)
    assert b.aug.scale == [0.08, 1.0]


def test_missing_root_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"data\.root"):
        load_config(None)


def test_yaml_overrides_defaults_and_command_line_overrides_yaml(tmp_path):
    path = write_yaml(tmp_path, "data:\n  root: /a\nloader:\n  batch_size_per_device: 64\noptim:\n  lr: 0.2\n")
    cfg = load_config(path)
    assert (cfg.data.root, cfg.loader.batch_size_per_device, cfg.optim.lr) == ("/a", 64, 0.2)
    assert cfg.loader.workers == LoaderConfig().workers  # untouched key keeps its default
    cfg = load_config(path, ["loader.batch_size_per_device=32", "train.epochs=3"])
    assert (cfg.data.root, cfg.loader.batch_size_per_device, cfg.optim.lr, cfg.train.epochs) == ("/a", 32, 0.2, 3)
    assert cfg.source == str(path)


def test_run_dir_defaults_to_config_file_stem(tmp_path):
    path = write_yaml(tmp_path, "data:\n  root: /a\noutput:\n  dir: out\n", name="my_recipe.yaml")
    assert load_config(path).run_dir == Path("out/my_recipe")
    assert load_config(path, ["output.run_name=r1"]).run_dir == Path("out/r1")


def test_empty_yaml_file_gives_defaults(tmp_path):
    cfg = load_config(write_yaml(tmp_path, ""), ROOT)
    assert cfg == load_config(None, ROOT)


# --- key.sub=value parsing ---------------------------------------------------------------


def test_parse_overrides_reads_yaml_scalars():
    parsed = parse_overrides(
        [
            "optim.lr=0.05",
            "optim.weight_decay=1e-4",
            "optim.nesterov=true",
            "train.compile=False",
            "input.mean=[0.5, 0.4, 0.3]",
            "model.pretrained_file=null",
            "output.run_name=",
            "model.name = resnet18",
            "data.root=/a=b",
        ]
    )
    assert parsed == {
        "optim.lr": 0.05,
        "optim.weight_decay": 1e-4,
        "optim.nesterov": True,
        "train.compile": False,
        "input.mean": [0.5, 0.4, 0.3],
        "model.pretrained_file": None,
        "output.run_name": "",
        "model.name": "resnet18",
        "data.root": "/a=b",
    }
    assert isinstance(parsed["optim.weight_decay"], float)


@pytest.mark.parametrize("item", ["optim.lr", "=0.1", ""])
def test_parse_overrides_rejects_items_without_key_and_value(item):
    with pytest.raises(ConfigError, match="command line") as err:
        parse_overrides([item])
    assert f"'{item}'" in str(err.value)


def test_overrides_set_typed_values():
    cfg = load_config(
        None,
        ROOT
        + [
            "optim.lr=0.05",
            "optim.nesterov=true",
            "input.mean=[0.5,0.4,0.3]",
            "input.std=0.2,0.3,0.4",
            "input.crop_pct=1",
            "train.epochs=7",
            "output.run_name=2024",
            "schedule.warmup_epochs=2",
        ],
    )
    assert cfg.optim.lr == 0.05 and cfg.optim.nesterov is True
    assert cfg.input.mean == [0.5, 0.4, 0.3] and cfg.input.std == [0.2, 0.3, 0.4]
    assert cfg.input.crop_pct == 1.0 and isinstance(cfg.input.crop_pct, float)  # int widened to float
    assert cfg.train.epochs == 7 and cfg.output.run_name == "2024"
    assert cfg.schedule.warmup_epochs == 2.0 and isinstance(cfg.schedule.warmup_epochs, float)


def test_exponent_floats_without_a_dot_are_floats_in_yaml_and_on_the_command_line(tmp_path):
    """PyYAML alone reads `1e-4` (no dot, YAML 1.1) as a string."""
    path = write_yaml(tmp_path, "data:\n  root: /a\noptim:\n  weight_decay: 1e-4\n  lr: 5E-2\n")
    cfg = load_config(path)
    assert cfg.optim.weight_decay == 1e-4 and cfg.optim.lr == 0.05
    cfg = load_config(path, ["optim.lr=2e-3", "input.mean=[5e-1,4e-1,3e-1]"])
    assert cfg.optim.lr == 0.002 and cfg.input.mean == [0.5, 0.4, 0.3]
    assert load_config(path, ["output.run_name=1e5x"]).output.run_name == "1e5x"  # not a number: still a str


def test_later_override_of_same_key_wins():
    assert load_config(None, ROOT + ["train.epochs=5", "train.epochs=6"]).train.epochs == 6


# --- errors: each names the key and where it came from -----------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("loader.batch_size_per_device=abc", "loader.batch_size_per_device"),
        ("loader.batch_size_per_device=true", "loader.batch_size_per_device"),  # a bool is not an int
        ("train.epochs=1.5", "train.epochs"),
        ("optim.nesterov=1", "optim.nesterov"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.lr=true", "optim.lr"),
        ("input.mean=0.5", "input.mean"),
        ("model.pretrained_file=null", "model.pretrained_file"),
        ("model.name=[a, b]", "model.name"),
    ],
)
def test_wrong_type_on_command_line(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, ROOT + [override])
    message = str(err.value)
    assert message.startswith("command line: ") and key in message and "expected" in message


@pytest.mark.parametrize(
    "text, key",
    [
        ("loader:\n  batch_size_per_device: abc\n", "loader.batch_size_per_device"),
        ("loader:\n  batch_size_per_device: true\n", "loader.batch_size_per_device"),
        ("optim:\n  nesterov: yes please\n", "optim.nesterov"),
        ("aug:\n  scale: 0.5\n", "aug.scale"),
    ],
)
def test_wrong_type_in_yaml_names_file_and_key(tmp_path, text, key):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, ROOT)
    assert str(err.value).startswith(f"{path}: ") and key in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("modle.name=resnet18", "modle.name"),
        ("model.nmae=resnet18", "model.nmae"),
        ("model=resnet18", "model"),
        ("lr=0.1", "lr"),
        ("source=x", "source"),  # Config.source is not a section
    ],
)
def test_unknown_key_on_command_line(override, key):
    with pytest.raises(ConfigError, match="unknown key") as err:
        load_config(None, ROOT + [override])
    assert str(err.value).startswith("command line: ") and f"'{key}'" in str(err.value)


def test_unknown_section_and_key_in_yaml(tmp_path):
    path = write_yaml(tmp_path, "data:\n  root: /a\nmodle:\n  name: x\n")
    with pytest.raises(ConfigError, match="unknown section 'modle'") as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")
    path = write_yaml(tmp_path, "data:\n  root: /a\nloader:\n  batch_size: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'loader\.batch_size'") as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")
    assert "batch_size_per_device" in str(err.value)  # lists the known keys


@pytest.mark.parametrize(
    "text, match",
    [
        ("- a\n- b\n", "expected a mapping of sections"),
        ("data: 3\n", "section 'data' must be a mapping"),
        ("data:\n  root: [unclosed\n", "not valid YAML"),
    ],
)
def test_malformed_yaml_names_file(tmp_path, text, match):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="config file not found") as err:
        load_config(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("loader.batch_size_per_device=0", "loader.batch_size_per_device"),
        ("loader.workers=-1", "loader.workers"),
        ("optim.lr=-0.1", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("optim.momentum=1.0", "optim.momentum"),
        ("input.crop_pct=1.5", "input.crop_pct"),
        ("aug.hflip=2", "aug.hflip"),
        ("input.mean=[0.5,0.5]", "input.mean"),
        ("input.std=[0.2,0,0.2]", "input.std"),
        ("aug.scale=[0.9,0.1]", "aug.scale"),
        ("schedule.warmup_epochs=90", "schedule.warmup_epochs"),  # == train.epochs (90)
        ("schedule.gamma=0", "schedule.gamma"),
        ("train.epochs=0", "train.epochs"),
        ("train.keep_last_checkpoints=0", "train.keep_last_checkpoints"),
        ("train.label_smoothing=1", "train.label_smoothing"),
        ("data.root=", "data.root"),
        ("aug.re_prob=1.5", "aug.re_prob"),
        ("aug.re_count=0", "aug.re_count"),
        ("aug.repeated_aug=-1", "aug.repeated_aug"),
        ("input.test_img_size=-1", "input.test_img_size"),
        ("train.bce_target_threshold=1", "train.bce_target_threshold"),
        ("train.grad_clip_norm=-1", "train.grad_clip_norm"),
        ("mixup.mixup_alpha=-0.1", "mixup.mixup_alpha"),
        ("mixup.cutmix_alpha=-1", "mixup.cutmix_alpha"),
        ("mixup.prob=1.5", "mixup.prob"),
        ("mixup.switch_prob=-0.5", "mixup.switch_prob"),
        ("ema.decay=1", "ema.decay"),
        ("ema.every_steps=0", "ema.every_steps"),
        ("ema.warmup_power=0", "ema.warmup_power"),
    ],
)
def test_impossible_values_name_the_key_and_where_they_came_from(tmp_path, override, key):
    path = write_yaml(tmp_path, "data:\n  root: /a\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    message = str(err.value)
    assert message.startswith(f"command line: {key}: "), message  # not blamed on the file
    assert "must" in message
    # The same value written in the file names the file.
    name, _, value = override.partition("=")
    section, field_name = name.split(".")
    text = f"{section}:\n  {field_name}: {value or repr('')}\n"
    if section != "data":
        text += "data:\n  root: /a\n"
    elif field_name != "root":
        text = text.replace("data:\n", "data:\n  root: /a\n")
    in_file = write_yaml(tmp_path, text, name="bad.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(in_file)
    assert str(err.value).startswith(f"{in_file}: {key}: "), str(err.value)


def test_a_value_left_at_its_default_is_blamed_on_the_config_file(tmp_path):
    path = write_yaml(tmp_path, "train:\n  epochs: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: data.root: ")


def test_warmup_must_end_before_training_does(tmp_path):
    with pytest.raises(ConfigError, match=r"schedule\.warmup_epochs"):
        load_config(None, ROOT + ["train.epochs=3", "schedule.warmup_epochs=3.5"])
    assert load_config(None, ROOT + ["train.epochs=3", "schedule.warmup_epochs=2.5"]).schedule.warmup_epochs == 2.5


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.source=s3", "data.source"),
        ("schedule.name=linear", "schedule.name"),
        ("input.interpolation=lanczos", "input.interpolation"),
        ("train.precision=fp8", "train.precision"),
        ("data.on_error=ignore", "data.on_error"),
        ("backend.device=tpu", "backend.device"),
        ("train.loss=focal", "train.loss"),
        ("mixup.mode=row", "mixup.mode"),
        ("aug.re_mode=blur", "aug.re_mode"),
    ],
)
def test_values_outside_choices_are_rejected(override, key):
    with pytest.raises(ConfigError, match="is not one of") as err:
        load_config(None, ROOT + [override])
    assert str(err.value).startswith(f"command line: {key}: ")


def test_choices_accept_their_values():
    cfg = load_config(
        None,
        ROOT + ["data.source=hf", "schedule.name=cosine", "input.interpolation=bicubic", "data.create_if_missing="],
    )
    assert (cfg.data.source, cfg.schedule.name, cfg.input.interpolation, cfg.data.create_if_missing) == (
        "hf",
        "cosine",
        "bicubic",
        "",
    )


# --- save, load, describe ----------------------------------------------------------------


def test_save_then_load_gives_an_equal_config(tmp_path):
    cfg = load_config(
        None,
        [
            "data.root=~/data/imagenet",
            "model.name=test_resnet",
            "input.mean=[0.5,0.4,0.3]",
            "aug.ratio=[0.5,2.0]",
            "optim.lr=0.0123456789",
            "optim.nesterov=true",
            "input.interpolation=bicubic",
            "output.log_with=[tensorboard]",
            "schedule.name=cosine",
            "schedule.warmup_epochs=1.5",
            "output.run_name=2024",
        ],
    )
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.aug.ratio == [0.5, 2.0] and again.optim.lr == 0.0123456789 and again.output.log_with == ["tensorboard"]
    assert again.source == str(path)
    # The default ratio is an irrational-looking float; it must survive the YAML round trip too.
    defaults = load_config(None, ROOT)
    save_config(defaults, path)
    assert load_config(path) == defaults


def test_describe_sections_lists_every_field_with_help_and_choices():
    text = describe_sections()
    lines = text.splitlines()
    for name, section_type in SECTIONS.items():
        assert f"{name}:" in lines
        for f in dataclasses.fields(section_type):
            line = next((text_line for text_line in lines if text_line.startswith(f"  {name}.{f.name} = ")), None)
            assert line is not None, f"{name}.{f.name} missing"
            assert line.endswith(f": {f.metadata['help']}")
            assert f.metadata["help"]
            for choice in f.metadata["choices"]:
                assert (choice or '""') in line
    assert "  input.interpolation = ''" in text and '[""|bilinear|bicubic|nearest]' in text
    assert "  aug.scale = [0.08, 1.0]" in text
    assert len([text_line for text_line in lines if text_line.startswith("  ")]) == sum(
        len(dataclasses.fields(t)) for t in SECTIONS.values()
    )


@pytest.mark.parametrize(
    ("old", "new"),
    [("data.hflip", "aug.hflip"), ("data.workers", "loader.workers"), ("data.img_size", "input.img_size")],
)
def test_a_key_from_before_the_section_split_names_its_new_place(tmp_path, old, new):
    section, name = old.split(".")
    path = write_yaml(tmp_path, f"{section}:\n  {name}: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: '{old}' has moved: write it as '{new}'"
    with pytest.raises(ConfigError, match=rf"^command line: '{old}' has moved: write it as '{new}'$"):
        load_config(None, [f"{old}=1"])


def test_no_section_has_more_than_twenty_keys():
    assert {name: len(dataclasses.fields(t)) for name, t in SECTIONS.items() if len(dataclasses.fields(t)) > 20} == {}
