"""Command line: `trainer train|eval|env|plot|prepare-digits ...` (also `python -m trainer`).

Under `accelerate launch -m trainer train ...` every process runs the same command;
Accelerate supplies the process group, this CLI the recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.config import ConfigError, describe_sections, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help=f"recipe YAML (default: {DEFAULT_CONFIG.name} from the source checkout)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.epochs=1 data.root=/data/imagenet")
    parser.add_argument("--debug", action="store_true", help="log from every process, at debug level")


def _load(args: argparse.Namespace):
    path = args.config
    if path is None:
        if not DEFAULT_CONFIG.is_file():
            raise ConfigError(f"no --config given and {DEFAULT_CONFIG} is absent; pass --config FILE")
        path = DEFAULT_CONFIG
    return load_config(path, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.progress import setup_logging
    from trainer.train import Trainer

    cfg = _load(args)
    trainer = Trainer(cfg)
    setup_logging(trainer.accelerator.is_main_process, args.debug)
    try:
        record = trainer.fit()
    finally:
        trainer.close()
    if trainer.accelerator.is_main_process:
        print(json.dumps({k: v for k, v in record.items() if not hasattr(v, "shape")}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from trainer.ema import EMA_WEIGHTS
    from trainer.progress import setup_logging
    from trainer.train import Trainer

    cfg = _load(args)
    trainer = Trainer(cfg)
    setup_logging(trainer.accelerator.is_main_process, args.debug)
    path = Path(args.checkpoint).expanduser()
    weights = path / (EMA_WEIGHTS if args.ema else "model.safetensors") if path.is_dir() else path
    if not weights.is_file():
        raise ConfigError(f"--checkpoint: {weights} not found (give a checkpoint directory or a .safetensors file)")
    try:
        trainer.accelerator.unwrap_model(trainer.model).load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError, SafetensorError) as err:  # another architecture or class count, or not a weights file
        detail = " ".join(line.strip() for line in str(err).strip().splitlines()[:2]) or type(err).__name__  # torch's second line names the tensor
        raise ConfigError(f"--checkpoint: {weights} cannot be loaded into {cfg.model.name} with {cfg.model.num_classes or len(trainer.data.classes)} classes: {detail}") from None
    classes = trainer.data.classes
    result = trainer.evaluate(num_classes_for_confusion=len(classes) if args.confusion and len(classes) <= 100 else 0)
    confusion = result.pop("confusion", None)
    if trainer.accelerator.is_main_process:
        out = Path(args.output) if args.output else cfg.run_dir / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps({"checkpoint": str(weights), **result}, indent=2))
        if confusion is not None:
            from trainer.plots import write_confusion_matrix, write_per_class_csv

            write_confusion_matrix(confusion, classes, out / "confusion.png")
            write_per_class_csv(confusion, classes, out / "per_class.csv")
        print(json.dumps(result))
    trainer.close()
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from trainer.backend import environment_report

    report = environment_report(args.device, args.precision)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if key == "warnings":
            continue
        print(f"{key:>22}: {value}")
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from trainer.plots import plot_command

    return plot_command(args.run_dir)


def cmd_prepare_digits(args: argparse.Namespace) -> int:
    from trainer.data.digits import write_digits

    print(write_digits(Path(args.root).expanduser()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from trainer.bench import bench_command

    return bench_command(_load(args), args)


def cmd_check_data(args: argparse.Namespace) -> int:
    from trainer.check_data import check_data_command

    return check_data_command(_load(args), args)


def cmd_import_args(args: argparse.Namespace) -> int:
    from trainer.import_args import import_args_command

    return import_args_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="Train timm image classifiers on MLU, CUDA or CPU through Accelerate.")
    sub = parser.add_subparsers(dest="command", required=True)
    sections = "config sections and keys (override any as key.sub=value):\n" + describe_sections()
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("train", help="train a model", epilog=sections, formatter_class=fmt)
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the val split (the reference's -e)", epilog=sections, formatter_class=fmt)
    _config_args(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory, or a .safetensors file (model.safetensors, model_ema.safetensors)")
    p.add_argument("--ema", action="store_true", help="with a directory: evaluate its EMA weights (model_ema.safetensors) instead of the raw ones")
    p.add_argument("--output", default=None, help="directory for eval.json and plots (default: RUN_DIR/eval)")
    p.add_argument("--no-confusion", dest="confusion", action="store_false", help="skip the confusion matrix and per-class CSV")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("env", help="print the resolved device, process group, precision and versions")
    p.add_argument("--device", default="auto", help="backend.device to resolve")
    p.add_argument("--precision", default="auto", help="train.precision to resolve")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("bench", help="measure model step, input pipeline and end to end; say which bounds training", epilog=sections, formatter_class=fmt)
    _config_args(p)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement, after warm-up")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file (default: RUN_DIR/bench.json)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("check-data", help="scan a dataset for unreadable files, label and class problems before a long run", epilog=sections, formatter_class=fmt)
    _config_args(p)
    p.add_argument("--limit", type=int, default=0, help="check only the first N images of each split (0: all)")
    p.add_argument("--examples", type=int, default=5, help="example paths shown per problem")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("import-args", help="turn a `python main.py ...` (pytorch/examples imagenet) command line into a recipe and a launch command")
    p.add_argument("--device", default="auto", help="device to launch on; auto reads it from main.py's --dist-backend / --no-accel")
    p.add_argument("--devices", type=int, default=0, help="devices per machine under --multiprocessing-distributed (0: assume 8)")
    p.add_argument("--output", default=None, help="write the recipe here and print the launch command (default: the recipe to stdout)")
    p.add_argument("main_py", nargs=argparse.REMAINDER, help="-- python main.py DIR -a resnet50 -b 128 ...")
    p.set_defaults(func=cmd_import_args)

    p = sub.add_parser("plot", help="write PNG curves of a run to RUN_DIR/plots/")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("prepare-digits", help="write the demo's digits dataset as an ImageNet-layout folder")
    p.add_argument("root", nargs="?", default="~/.cache/trainer/digits")
    p.set_defaults(func=cmd_prepare_digits)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainer.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"trainer: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
