"""Side by side on one ImageNet-like JPEG folder: PyTorch's imagenet/main.py loop vs this trainer.

What runs (see benchmarks/README.md for results and for why the defaults are small):

1. input pipeline per core: decode + augment + collate only, in this process with one
   thread and no workers, batch by batch in turn: the reference's ImageFolder and
   transforms, the trainer's recipe pipeline (float output), its fast path (uint8,
   tensor transforms, simplejpeg when installed) and the fast path without simplejpeg;
2. end to end, ResNet50 at --img-size, --batch-size, --workers: four loops, each in its
   own process (one Accelerate state each), taking turns of --steps steps for --rounds
   rounds (A B C D, B C D A, ...): "reference" (imagenet/main.py's train loop: ImageFolder,
   RandomResizedCrop + flip + ToTensor + Normalize, fp32, contiguous, torch.optim.SGD),
   "trainer recipe" (configs/resnet50_imagenet.yaml: fp32, contiguous, host normalize,
   no draft), "trainer fast path" (channels_last, normalize on device, draft decode,
   foreach SGD, precision auto: bf16 only where native) and "reference, memory retained"
   (the reference with glibc keeping freed memory, as the trainer does on the CPU, to
   show how much of the difference that is; --no-retained-reference leaves it out);
3. trainer overhead: `Trainer.train_step` vs a bare loop (same model, optimizer,
   precision and pre-built batches; no Accelerate), step by step in turn.

    python benchmarks/bench_vs_reference.py              # 7-12 minutes on 2 cores
    python benchmarks/bench_vs_reference.py --batch-size 64 --steps 8 --workers 8  # bigger machines
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import machine  # a sibling module: these scripts run as benchmarks/<name>.py
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
DATA_VERSION = 1
SETTINGS = {"trainer recipe": "recipe", "trainer fast path": "fast"}  # loop name -> trainer_config setting


# -- data -------------------------------------------------------------------------------
def natural_image(rng: np.random.Generator, size: tuple[int, int] = (500, 375)) -> Image.Image:
    """Photo-like content: a smooth colour field, blurred shapes, grain; ~90 KB at quality 90."""
    width, height = size
    field = rng.integers(0, 256, (int(rng.integers(3, 8)), int(rng.integers(4, 10)), 3), dtype=np.uint8)
    image = Image.fromarray(field).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 15))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x, y, x + int(rng.integers(20, 200)), y + int(rng.integers(20, 200))]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(
            box, fill=tuple(int(c) for c in rng.integers(0, 256, 3))
        )
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    grain = rng.normal(0, rng.uniform(8, 22), (height, width, 1)) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + grain, 0, 255).astype(np.uint8))


def make_dataset(root: Path, images: int, classes: int) -> Path:
    """ROOT/{train,val}/<class>/*.JPEG of 500x375 quality-90 JPEGs; reused when already there."""
    meta = {"version": DATA_VERSION, "images": images, "classes": classes}
    marker = root / "dataset.json"
    if marker.exists() and json.loads(marker.read_text()) == meta:
        return root
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", 2 * classes)):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            natural_image(rng).save(folder / f"{split}_{i:05d}.JPEG", quality=90)
    marker.write_text(json.dumps(meta))
    return root


# -- the three loops ----------------------------------------------------------------------
def reference_transform(size: int):
    import torchvision.transforms as T

    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def trainer_config(args: argparse.Namespace, setting: str, workers: int, img_size: int, out: str):
    """configs/resnet50_imagenet.yaml on the benchmark data, in the "recipe" or "fast" setting."""
    from trainer.config import load_config

    common = [
        f"data.root={args.data}",
        f"input.img_size={img_size}",
        f"loader.batch_size_per_device={args.batch_size}",
        f"loader.workers={workers}",
        "model.num_classes=1000",
        f"backend.device={args.device}",
        f"output.dir={out}",
        f"output.run_name={setting}",
        "output.progress=log",
        "output.plots=false",
    ]
    switches = {
        "recipe": [
            "loader.normalize_on_device=false",
            "loader.draft_decode=false",
            "train.channels_last=false",
            "train.precision=fp32",
        ],
        "fast": [
            "loader.normalize_on_device=true",
            "loader.draft_decode=true",
            "train.channels_last=true",
            "train.precision=auto",
            "optim.implementation=foreach",
        ],
    }[setting]
    return load_config(REPO / "configs" / "resnet50_imagenet.yaml", common + switches)


def forever(loader, sampler=None):
    for epoch in itertools.count():
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader


def sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def reference_loop(args: argparse.Namespace):
    """imagenet/main.py's train(): the same calls per step (drop_last keeps batches equal)."""
    import torchvision
    from torch.utils.data import DataLoader

    device = torch.device(args.device if args.device != "auto" else "cpu")
    dataset = torchvision.datasets.ImageFolder(str(Path(args.data) / "train"), reference_transform(args.img_size))
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type != "cpu",
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    batches, losses, top1 = forever(loader), [], []

    def step() -> None:
        images, target = next(batches)
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        output = model(images)
        loss = criterion(output, target)
        top = output.topk(5, 1).indices.eq(target[:, None])  # main.py's accuracy(output, target, topk=(1, 5))
        losses.append(loss.item())
        top1.append(top[:, :1].float().sum())  # main.py's AverageMeter keeps tensors: no sync
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, device


def trainer_loop(args: argparse.Namespace, setting: str):
    from trainer.bench import batch_stream
    from trainer.metrics import RunningSums
    from trainer.train import Trainer

    trainer = Trainer(trainer_config(args, setting, args.workers, args.img_size, tempfile.mkdtemp()))
    stream, sums = batch_stream(trainer), RunningSums(trainer.accelerator.device, ("loss", "top1", "n"))

    def step() -> None:  # what Trainer.train_epoch does per batch, less logging
        trainer.train_step(next(stream), sums)
        trainer.scheduler.step()

    return step, trainer.accelerator.device


def arm_main(name: str, args: argparse.Namespace, conn) -> None:
    """One loop in its own process: build, warm up, then run turns of steps on request."""
    if name == "reference, memory retained":
        from trainer.backend import retain_freed_host_memory

        retain_freed_host_memory()  # what the trainer does on the CPU; for the reference, MALLOC_MMAP_MAX_=0 does it
    step, device = reference_loop(args) if name.startswith("reference") else trainer_loop(args, SETTINGS[name])
    for _ in range(args.warmup):
        step()
    conn.send("ready")
    while (request := conn.recv()) != "stop":
        times = []
        for _ in range(request):
            sync(device)
            start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            step()
            sync(device)
            end = resource.getrusage(resource.RUSAGE_SELF)
            times.append(
                (
                    time.perf_counter() - start,
                    end.ru_utime - usage.ru_utime,
                    end.ru_stime - usage.ru_stime,
                    end.ru_minflt - usage.ru_minflt,
                )
            )
        conn.send(times)


def overhead_main(args: argparse.Namespace, conn) -> None:
    """Trainer.train_step vs a bare step on the same model, optimizer and pre-built batches."""
    import torch.nn.functional as F

    from trainer.bench import batch_stream
    from trainer.metrics import RunningSums
    from trainer.train import Trainer

    trainer = Trainer(trainer_config(args, "fast", 0, args.overhead_img_size, tempfile.mkdtemp()))
    acc, sums = trainer.accelerator, RunningSums(trainer.accelerator.device, ("loss", "top1", "n"))
    batches = list(itertools.islice(batch_stream(trainer), 4))
    model, optimizer = acc.unwrap_model(trainer.model), trainer.optimizer.optimizer
    norm, device = trainer.normalize, acc.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)

    def bare(batch) -> None:
        images = ((batch["images"].float() - norm.mean) / norm.std).contiguous(memory_format=norm.memory_format)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def with_trainer(batch) -> None:
        trainer.train_step(batch, sums)
        trainer.scheduler.step()

    times = {"bare": [], "trainer": []}
    for i in range(args.warmup + args.overhead_pairs):
        for arm, fn in (("bare", bare), ("trainer", with_trainer))[:: 1 if i % 2 else -1]:
            sync(device)
            start = time.perf_counter()
            fn(batches[i % len(batches)])
            sync(device)
            if i >= args.warmup:
                times[arm].append(time.perf_counter() - start)
    conn.send({"times": times, "precision": acc.mixed_precision})


# -- measurements -------------------------------------------------------------------------
def pipeline_per_core(args: argparse.Namespace) -> dict[str, float]:
    """img/s of decode + augment + collate on one core, batch by batch in turn."""
    import torchvision
    from torch.utils.data import DataLoader

    import trainer.data.decode as decode
    from trainer.data.loader import create_datasets, create_loader

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker's setting
    reference = DataLoader(
        torchvision.datasets.ImageFolder(str(Path(args.data) / "train"), reference_transform(args.img_size)),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
    )
    arms = {"reference": (forever(reference), decode._simplejpeg)}
    for label, setting, simplejpeg in (
        ("trainer recipe", "recipe", decode._simplejpeg),
        ("trainer fast path", "fast", decode._simplejpeg),
        ("trainer fast path, PIL decoder", "fast", None),
    ):
        cfg = trainer_config(args, setting, 0, args.img_size, tempfile.mkdtemp())
        data = create_datasets(**cfg.data_sections(), model_name=cfg.model.name, seed=0, rank=0, world_size=1)
        loader = create_loader(
            data.train,
            cfg.loader,
            batch_size=args.batch_size,
            pin_kwargs={"pin_memory": False},
            sampler=data.train_sampler,
            drop_last=True,
        )
        arms[label] = (forever(loader, data.train_sampler), simplejpeg)
    if decode._simplejpeg is None:
        del arms["trainer fast path, PIL decoder"]  # the same as the fast path here
    times: dict[str, list[float]] = {label: [] for label in arms}
    installed = decode._simplejpeg
    for i in range(1 + args.rounds * args.pipeline_batches):  # the first turn warms up
        for label, (batches, simplejpeg) in arms.items():
            decode._simplejpeg = simplejpeg
            start = time.perf_counter()
            next(batches)
            if i:
                times[label].append(time.perf_counter() - start)
    decode._simplejpeg = installed
    torch.set_num_threads(threads)
    return {label: args.batch_size / statistics.median(t) for label, t in times.items()}


def end_to_end(args: argparse.Namespace, names: list[str]) -> dict[str, dict]:
    ctx = mp.get_context("spawn")
    arms = {}
    for name in names:  # built one after another: each warms up alone
        parent, child = ctx.Pipe()
        process = ctx.Process(target=arm_main, args=(name, args, child))
        process.start()
        child.close()  # so that recv() fails instead of hanging if the arm dies
        arms[name] = (process, parent)
        if _receive(parent, name) != "ready":
            raise RuntimeError(f"{name}: did not start")
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    try:
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                arms[name][1].send(args.steps)
                times[name].append(_receive(arms[name][1], name))
    finally:
        for process, conn in arms.values():
            if process.is_alive():
                conn.send("stop")
            process.join(60)
    figures = {}
    for name, turns in times.items():
        steps = sum(turns, [])
        wall = [[s[0] for s in turn] for turn in turns]
        figures[name] = {
            "img_per_s": args.batch_size / statistics.median(s[0] for s in steps),
            "step_s": wall,
            "round_img_per_s": [args.batch_size / statistics.median(w) for w in wall],
            # The main process only (loader workers are not counted): user and system CPU
            # seconds and minor page faults per step, to tell compute from allocator cost.
            "user_s_per_step": statistics.median(s[1] for s in steps),
            "sys_s_per_step": statistics.median(s[2] for s in steps),
            "page_faults_per_step": statistics.median(s[3] for s in steps),
        }
    reference = figures[names[0]]
    for f in figures.values():
        # NOTE: a ratio within each round (turns adjacent in time), then their median:
        # load from other processes drifts over minutes, and this cancels most of it.
        f["round_vs_reference"] = [a / b for a, b in zip(f["round_img_per_s"], reference["round_img_per_s"])]
        f["vs_reference"] = statistics.median(f["round_vs_reference"])
    return figures


def overhead(args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=overhead_main, args=(args, child))
    process.start()
    child.close()
    result = _receive(parent, "overhead")
    process.join(60)
    bare, with_trainer = result["times"]["bare"], result["times"]["trainer"]
    # NOTE: the ratio within each pair (adjacent in time) cancels most of the load drift.
    ratio = statistics.median(t / b for t, b in zip(with_trainer, bare))
    return {
        "bare_step_s": statistics.median(bare),
        "trainer_step_s": statistics.median(with_trainer),
        "overhead": ratio - 1,
        "pairs": len(bare),
        "precision": result["precision"],
    }


def _receive(conn, name: str):
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError(f"{name}: the process died (its traceback is above)") from None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", default=str(Path.home() / ".cache" / "trainer" / "bench-jpegs"), help="dataset cache dir (made once)"
    )
    p.add_argument("--images", type=int, default=320, help="training images (500x375 JPEGs)")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=1, help="timed steps per loop per turn")
    p.add_argument("--rounds", type=int, default=10, help="turns per loop")
    p.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="untimed steps per loop before its first turn (glibc's malloc settles over several)",
    )
    p.add_argument("--pipeline-batches", type=int, default=4, help="pipeline batches per arm per round")
    p.add_argument(
        "--overhead-img-size",
        type=int,
        default=64,
        help="smaller than 224 on purpose: a shorter step shows a fixed cost more",
    )
    p.add_argument("--overhead-pairs", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument(
        "--retained-reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the reference with freed host memory retained, as the trainer does on the CPU",
    )
    p.add_argument(
        "--parts",
        default="pipeline,e2e,overhead",
        type=lambda v: set(v.split(",")),
        help="which measurements to run (comma-separated)",
    )
    args = p.parse_args()
    args.data = str(Path(args.data).expanduser())
    start = time.perf_counter()
    make_dataset(Path(args.data), args.images, args.classes)
    report: dict = {"machine": machine(), "args": {**vars(args), "parts": sorted(args.parts)}}
    pipe = report["pipeline_img_per_s_per_core"] = pipeline_per_core(args) if "pipeline" in args.parts else {}
    e2e = report["end_to_end"] = (
        end_to_end(args, ["reference", *SETTINGS, *(["reference, memory retained"] if args.retained_reference else [])])
        if "e2e" in args.parts
        else {}
    )
    over = report["overhead"] = overhead(args) if "overhead" in args.parts else {}
    report["wall_s"] = time.perf_counter() - start
    print(
        f"{report['machine']}\nResNet50 {args.img_size}px, batch {args.batch_size}, {args.workers} workers, "
        f"{args.rounds} rounds x {args.steps} steps per loop, {report['wall_s']:.0f} s"
    )
    if e2e:
        print(
            f"\n{'end to end':<28}{'img/s':>7}{'vs ref':>7}{'user s':>8}{'sys s':>7}{'faults':>8} "
            " vs ref per round (vs ref: their median)"
        )
        for name, f in e2e.items():
            print(
                f"{name:<28}{f['img_per_s']:>7.2f}{f['vs_reference']:>7.2f}{f['user_s_per_step']:>8.2f}{f['sys_s_per_step']:>7.2f}"
                f"{f['page_faults_per_step'] / 1e3:>7.0f}k  {' '.join(f'{x:.2f}' for x in f['round_vs_reference'])}"
            )
        print("(user s, sys s, faults: CPU seconds and minor page faults per step in the loop's main process, medians)")
    if pipe:
        print(f"\n{'input pipeline, 1 core':<34}{'img/s':>8}{'vs ref':>8}")
        for name, v in pipe.items():
            print(f"{name:<34}{v:>8.1f}{v / pipe['reference']:>8.2f}")
    if over:
        print(
            f"\ntrainer overhead at {args.overhead_img_size}px ({over['precision']}): {over['overhead']:+.1%} "
            f"(train_step {over['trainer_step_s'] * 1e3:.0f} ms vs bare "
            f"{over['bare_step_s'] * 1e3:.0f} ms, median of {over['pairs']} "
            "pairs)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
