"""`trainer predict MODEL IMAGES...`: the top-k classes of each image, with names and probabilities.

MODEL is a model folder, a run directory or a checkpoint (`trainer.model_folder.resolve_model`);
IMAGES are files, folders (searched recursively for images) or globs. Images take the
training pipeline's val path: the same reader interface, decoder (`trainer.data.decode`)
and timm val transform, built from the folder's own input config, in batches on the
device that `backend.device` resolves. An image that cannot be read is named, counted and
skipped, as in training.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.data.readers import IMG_EXTENSIONS, Sample
from trainer.errors import ConfigError, DataError
from trainer.labels import display_name


@dataclass
class ImageFiles:
    """The images to predict, as a `Reader`: the label of each is its own index in `files`.

    NOTE: the loader drops images it cannot decode from their batch, so the label is how
    a row of logits finds its file again.
    """

    files: list[str]
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> Sample:
        with open(self.files[index], "rb") as f:
            return Sample(f.read(), index, self.files[index])


def expand_images(arguments: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files named, found under folders or matched by globs, in order and once each; and the arguments naming none."""
    files: list[str] = []
    missing: list[tuple[str, str]] = []
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_file():
            found = [str(path)]  # named explicitly: tried whatever its extension
        elif path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        else:
            pattern = os.path.expanduser(argument)
            matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(argument) else []
            found = [m for m in matches if os.path.isfile(m)]
        if not found:
            missing.append((argument, "no image found" if path.is_dir() or glob.has_magic(argument) else "not found"))
        files += found
    return list(dict.fromkeys(files)), missing


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: Any,
    normalize: Any,
    accelerator: Any,
    top_k: int,
) -> tuple[dict[int, list], list[str]]:
    """Top-k (index, probability) per image index, and the `path<TAB>reason` lines of the images skipped."""
    results: dict[int, list] = {}
    skipped: list[str] = []
    for batch in loader:
        skipped += batch["skipped"]
        if batch["labels"].numel() == 0:
            continue
        with accelerator.autocast():
            logits = model(normalize(batch["images"]))
        top = logits.float().softmax(dim=1).topk(top_k, dim=1)
        # NOTE: one copy to the host per batch: the results are printed anyway
        for image, indices, probs in zip(batch["labels"].tolist(), top.indices.tolist(), top.values.tolist()):
            results[image] = list(zip(indices, probs))
    return results, skipped


def _rows(files: list[str], results: dict[int, list], names: list[str], descriptions: dict[str, str]) -> list[dict]:
    """One row per predicted image, in the order the images were given."""
    rows = []
    for image, top in sorted(results.items()):
        classes = []
        for rank, (index, prob) in enumerate(top, start=1):
            label = names[index]
            described = {"label": label, "description": descriptions.get(label), "probability": prob}
            classes.append({"rank": rank, "index": index, **described})
        rows.append({"image": files[image], "top": classes})
    return rows


def format_table(rows: list[dict[str, Any]], descriptions: dict[str, str]) -> str:
    """For people: each image, then its classes by rank with their probabilities."""
    lines = []
    for row in rows:
        lines.append(row["image"])
        for c in row["top"]:
            shown = display_name(c["label"], descriptions)
            extra = f" ({c['label']})" if shown != c["label"] else ""
            lines.append(f"  {c['rank']:>2}  {c['probability']:7.2%}  {shown}{extra}")
    return "\n".join(lines)


def format_csv(rows: list[dict[str, Any]]) -> str:
    """For scripts: one line per image and rank."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "rank", "index", "label", "description", "probability"])
    for row in rows:
        for c in row["top"]:
            description, probability = c["description"] or "", f"{c['probability']:.6g}"
            writer.writerow([row["image"], c["rank"], c["index"], c["label"], description, probability])
    return out.getvalue()


def _report(
    args: Any,
    weights: Path,
    rows: list[dict[str, Any]],
    skipped: list[tuple[str, str]],
    descriptions: dict[str, str],
) -> None:
    """The predictions on stdout as asked; each skipped image, and their count, on stderr."""
    if args.json:
        document = {
            "model": str(weights),
            "images": len(rows) + len(skipped),
            "predicted": len(rows),
            "skipped": [{"image": image, "reason": reason} for image, reason in skipped],
            "predictions": rows,
        }
        print(json.dumps(document, indent=2))
    elif args.csv:
        sys.stdout.write(format_csv(rows))
    elif rows:
        print(format_table(rows, descriptions))
    for image, reason in skipped:
        print(f"trainer: skipped {image}: {reason}", file=sys.stderr)
    if skipped:
        print(f"trainer: {len(skipped)} of {len(rows) + len(skipped)} images skipped", file=sys.stderr)


def predict_command(args: Any) -> int:
    """`trainer predict`: load the model, predict every image, print the table (or JSON / CSV)."""
    from trainer.backend import create_accelerator
    from trainer.config import LoaderConfig
    from trainer.data.dataset import ImageDataset, _SampleDecoder
    from trainer.data.loader import create_loader, create_val_transform
    from trainer.data.pipeline import Normalizer, place
    from trainer.model_folder import class_labels, create_from_config, data_config, load_weights_file, resolve_model

    if args.top_k < 1 or args.batch_size < 1 or args.workers < 0:
        got = f"{args.top_k}, {args.batch_size}, {args.workers}"
        raise ConfigError(f"--top-k and --batch-size must be >= 1 and --workers >= 0, got {got}")
    source = resolve_model(args.model, ema=args.ema)
    model = create_from_config(source.config)
    load_weights_file(model, source.weights)
    model.eval()
    files, missing = expand_images(args.images)
    if not files:
        kinds = f"files, folders or globs of {', '.join(IMG_EXTENSIONS)}"
        raise DataError(f"no image found in {', '.join(args.images)} ({kinds})")
    accelerator, backend = create_accelerator(args.device, args.precision)
    if accelerator.num_processes > 1:
        raise ConfigError("trainer predict runs in one process; start it without accelerate launch")
    input_cfg = data_config(source.config)
    # As the val loader: JPEGs decode at a reduced scale no smaller than the resize needs.
    draft = int(input_cfg["input_size"][-1] / input_cfg["crop_pct"])
    transform = create_val_transform(input_cfg, 0, normalize_on_device=True)
    dataset = ImageDataset(ImageFiles(files), _SampleDecoder(transform, len(files), draft, "skip", seed=0))
    loader_cfg = LoaderConfig(workers=args.workers, persistent_workers=False)
    loader = create_loader(dataset, loader_cfg, batch_size=args.batch_size, pin_kwargs=backend.pin_memory_kwargs())
    normalize = Normalizer(input_cfg["mean"], input_cfg["std"], accelerator.device, channels_last=False)
    names, descriptions = class_labels(source.config)
    top_k = min(args.top_k, len(names))
    placed = place(loader, accelerator, shard=False)
    results, skipped_lines = predict(accelerator.prepare(model), placed, normalize, accelerator, top_k)
    accelerator.end_training()
    skipped = [tuple(line.split("\t", 1)) for line in skipped_lines] + missing
    rows = _rows(files, results, names, descriptions)
    _report(args, source.weights, rows, skipped, descriptions)
    if not rows:
        raise DataError(f"none of the {len(skipped)} images could be read (each is named above)")
    return 0
