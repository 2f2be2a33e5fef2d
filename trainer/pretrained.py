"""Where `model.pretrained` points, resolved to a local weights file: nothing is ever downloaded.

It may name:
1. a model folder in timm's hub format (`config.json` + `model.safetensors`), as a path or
   as `local-dir:<path>` (timm's own prefix for one);
2. a run directory (its `model/` folder, or `config.yaml` + `model.safetensors`) or one of
   its checkpoints (`checkpoints/step_N/`), read by `trainer.model_folder.resolve_model`;
3. a weights file (.safetensors, .pth, .bin), what `model.pretrained_file` used to take;
4. a Hugging Face hub id (`hf-hub:timm/resnet50.a1_in1k` or `timm/resnet50.a1_in1k`) that
   is already in the local hub cache; a miss says so and downloads nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import ModelError

KEY = "model.pretrained"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's hub folder names, safetensors first
MODEL_CONFIG = "config.json"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class PretrainedSource:
    """A resolved `model.pretrained`: the weights file and what its folder says about it."""

    weights: Path
    architecture: str = ""  # timm name the weights were made for; "" when nothing says
    label_names: tuple[str, ...] = ()  # the head's classes, where the folder names them
    described: str = ""  # how the source is named in log lines and errors


def resolve_pretrained(spec: str, cache_dir: str | None = None) -> PretrainedSource:
    """The local weights `spec` names, with the architecture its folder records.

    Args:
        spec: the value of `model.pretrained` (see the module docstring).
        cache_dir: the hub cache to look in; None is huggingface_hub's (HF_HUB_CACHE / HF_HOME).

    Raises:
        ModelError: a path that does not exist or holds no weights, or a hub id not cached.
    """
    text = spec.strip()
    if text.startswith(HF_HUB):
        return _from_hub_cache(text[len(HF_HUB) :], cache_dir)
    path = Path(text.removeprefix(LOCAL_DIR)).expanduser()
    if path.is_file():
        return PretrainedSource(path, described=str(path))
    if path.is_dir():
        return _from_folder(path, str(path))
    if not text.startswith(LOCAL_DIR) and _HUB_ID.match(text):
        return _from_hub_cache(text, cache_dir)
    raise ModelError(
        f"{KEY}: {path} does not exist (give a model folder, run directory, weights file or cached hub id)"
    )


def _from_folder(path: Path, described: str) -> PretrainedSource:
    """A model folder, a run directory or a checkpoint, read as `trainer predict` and `export` read them."""
    from trainer.model_folder import resolve_model

    try:
        source = resolve_model(path)
    except ModelError as err:
        raise ModelError(f"{KEY}: {err}") from None
    weights = source.weights
    if not weights.is_file():  # a hub folder may hold torch weights only
        weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
        if weights is None:
            raise ModelError(f"{KEY}: {path} holds no {' or '.join(WEIGHT_FILES)}")
    labels = tuple(str(n) for n in source.config.get("label_names") or ())
    return PretrainedSource(weights, str(source.config.get("architecture", "")), labels, described)


def _from_hub_cache(repo_id: str, cache_dir: str | None) -> PretrainedSource:
    """A hub model folder from the local cache only (huggingface_hub's try_to_load_from_cache never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    from trainer.model_folder import read_config

    found = {}
    for name in (MODEL_CONFIG, *WEIGHT_FILES):
        cached = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(cached, str):
            found[name] = Path(cached)
    if MODEL_CONFIG not in found or not any(name in found for name in WEIGHT_FILES):
        raise ModelError(
            f"{KEY}: hub id {repo_id!r} is not in the local hub cache (HF_HUB_CACHE); nothing is downloaded: "
            f"fetch it once with `huggingface-cli download {repo_id}` where there is a network, or give a local folder"
        )
    snapshot = found[MODEL_CONFIG].parent
    weights = next(found[name] for name in WEIGHT_FILES if name in found)
    try:
        config = read_config(snapshot)
    except ModelError as err:
        raise ModelError(f"{KEY}: hf-hub:{repo_id}: {err}") from None
    labels = tuple(str(n) for n in config.get("label_names") or ())
    return PretrainedSource(weights, str(config["architecture"]), labels, f"hf-hub:{repo_id}")
