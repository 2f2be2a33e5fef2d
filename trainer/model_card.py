"""The README.md model card of a model folder, written from the run: recipe, data, results, how to reproduce."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from trainer.config import Config, config_to_dict
from trainer.labels import display_name


def _top(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def results_table(records: list[dict[str, Any]], ema: bool) -> str:
    """Final and best val top-1/top-5 (of the EMA weights with `ema`), as a markdown table."""
    suffix = "_ema" if ema else ""
    validated = [r for r in records if isinstance(r.get(f"val_top1{suffix}"), (int, float))]
    if not validated:
        return "No validation was recorded for these weights.\n"
    last, best = validated[-1], max(validated, key=lambda r: r[f"val_top1{suffix}"])
    rows = [("final", last), ("best", best)]
    lines = ["| | epoch | val top-1 | val top-5 | val loss |", "| --- | --- | --- | --- | --- |"]
    for what, r in rows:
        figures = " | ".join(_top(r, f"val_{k}{suffix}") for k in ("top1", "top5", "loss"))
        lines.append(f"| {what} | {r['epoch'] + 1} | {figures} |")
    note = "\nThis folder holds the final weights; the best epoch's are its checkpoint (kept in `checkpoints/`).\n"
    if best is last:
        note = ""
    return "\n".join(lines) + "\n" + note


def _batch(cfg: Config) -> str:
    """The batch as configured: a fixed global batch (loader.global_batch_size), or per device and accumulation."""
    ld = cfg.loader
    if ld.global_batch_size:
        return (
            f"global {ld.global_batch_size} ({ld.batch_size_per_device} per "
            "device, accumulation derived from the process count)"
        )
    return f"{ld.batch_size_per_device} per device, gradient accumulation {cfg.train.grad_accum_steps}"


def _recipe(cfg: Config) -> list[str]:
    a, t, o = cfg.aug, cfg.train, cfg.optim
    augment = [f"RandomResizedCrop scale {a.scale}", f"hflip {a.hflip}"]
    augment += [f"auto-augment {a.auto_augment}"] if a.auto_augment else []
    augment += [f"random erasing {a.re_prob}"] if a.re_prob else []
    augment += [f"mixup {cfg.mixup.mixup_alpha}"] if cfg.mixup.mixup_alpha else []
    augment += [f"cutmix {cfg.mixup.cutmix_alpha}"] if cfg.mixup.cutmix_alpha else []
    augment += [f"label smoothing {t.label_smoothing}"] if t.label_smoothing else []
    started = f", fine-tuned from `{cfg.model.pretrained}`" if cfg.model.pretrained else ""
    layer_decay = f", layer-wise lr decay {o.layer_decay}" if o.layer_decay else ""
    return [
        f"- **Epochs:** {t.epochs}{started}",
        f"- **Optimizer:** {o.name}, lr {o.lr}, weight decay {o.weight_decay}{layer_decay}",
        f"- **Schedule:** {cfg.schedule.name}, warmup {cfg.schedule.warmup_epochs} epochs",
        f"- **Batch:** {_batch(cfg)}",
        f"- **Precision:** {t.precision}; loss {t.loss}",
        f"- **Augmentation:** {', '.join(augment)}",
        f"- **EMA:** decay {cfg.ema.decay}" if cfg.ema.enabled else "- **EMA:** off",
    ]


def model_card(
    cfg: Config,
    records: list[dict[str, Any]],
    *,
    config: dict[str, Any],
    run_dir: Path,
    ema: bool = False,
    processes: int = 0,
) -> str:
    """The model card of `run_dir`'s model folder (`model_ema/` with `ema`).

    Args:
        cfg: the run's resolved config (config.yaml).
        records: the run's per-epoch metrics (metrics.jsonl).
        config: the folder's config.json dict.
        processes: how many processes trained it (0: unknown).
    """
    from timm.models._hub import generate_readme

    folder = run_dir / ("model_ema" if ema else "model")
    pretrained = config["pretrained_cfg"]
    names, descriptions = config.get("label_names") or [], config.get("label_descriptions") or {}
    shown = ", ".join(display_name(n, descriptions) for n in names[:10]) + (", ..." if len(names) > 10 else "")
    size = pretrained["input_size"]
    test = pretrained.get("test_input_size")
    details = {
        "Model Type": "Image classification",
        "Architecture": config["architecture"] + (" (EMA of the weights)" if ema else ""),
        "Classes": f"{config['num_classes']}: {shown}",
        "Image size": f"{size[-1]} x {size[-2]} (train)" + (f", {test[-1]} x {test[-2]} (test)" if test else ""),
        "Preprocessing": (
            f"resize to size / crop_pct ({pretrained['crop_pct']}), {pretrained['interpolation']}, "
            f"{pretrained.get('crop_mode', 'center')} crop, "
            f"mean {list(pretrained['mean'])}, std {list(pretrained['std'])}"
        ),
        "Training data": f"{cfg.data.source} `{cfg.data.root}`, split {cfg.data.train_split}",
    }
    usage = (
        "```python\nimport timm\n\n"
        f'model = timm.create_model("local-dir:{folder}", pretrained=True).eval()  # timm >= 1.0.16\n'
        "# once uploaded (huggingface-cli upload NAME/REPO this-folder):\n"
        '# timm.create_model("hf-hub:NAME/REPO", pretrained=True)\n'
        "config = timm.data.resolve_data_config({}, model=model)\n"
        "transform = timm.data.create_transform(**config)\n```\n\n"
        f"or from the command line: `trainer predict {folder} IMAGE...`\n"
    )
    card = {
        "tags": ["image-classification", "timm"],  # NOTE: newer timm adds "transformers" unless told the tags
        "license": "other",  # the weights follow the terms of the data they were trained on: set it before publishing
        "description": f"A {config['architecture']} trained with the trainer from run `{run_dir}`.",
        "details": details,
        "usage": usage,
    }
    text = generate_readme(card, f"{run_dir.name}{'-ema' if ema else ''}")
    samples = next((r for r in reversed(records) if r.get("train_samples")), {})
    launch = f"accelerate launch --num_processes {processes} -m trainer train" if processes > 1 else "trainer train"
    parts = [
        "\n## Results\n",
        results_table(records, ema),
        "\n## Training\n",
        *_recipe(cfg),
        f"- **Images per epoch:** {samples.get('train_samples', 'n/a')} train, {samples.get('val_samples', 'n/a')} val",
        f"- **Processes:** {processes or 'not recorded'}",
        f"- **Curves:** `{run_dir / 'plots'}` (loss, top-1, top-5, lr, img/s; `trainer plot {run_dir}` redraws them);"
        f" per-epoch figures in `{run_dir / 'metrics.jsonl'}`",
        "\n## Reproduce\n",
        f"```bash\n{launch} --config {run_dir / 'config.yaml'} output.run_name={run_dir.name}_again\n```\n",
        "The resolved recipe (`config.yaml`):\n",
        "```yaml\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False) + "```\n",
    ]
    return text + "\n".join(parts)
