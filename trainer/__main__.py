"""Command line: `trainer train|eval|predict|export|model-folder|env|bench|check-data|convert|...` (python -m trainer).

Under `accelerate launch -m trainer train ...` every process runs the same command;
Accelerate supplies the process group, this CLI the recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.config import describe_sections, load_config
from trainer.errors import USER_ERRORS, ConfigError

EXPORTERS = ("auto", "dynamo", "torchscript")  # trainer.export.onnx_exporter; named here so --help needs no torch
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help=f"recipe YAML (default: {DEFAULT_CONFIG.name} from the source checkout)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. train.epochs=1 data.root=/data/imagenet",
    )
    parser.add_argument("--debug", action="store_true", help="log from every process, at debug level")


def _load(args: argparse.Namespace):
    path = args.config
    if path is None:
        if not DEFAULT_CONFIG.is_file():
            raise ConfigError(f"no --config given and {DEFAULT_CONFIG} is absent; pass --config FILE")
        path = DEFAULT_CONFIG
    return load_config(path, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)  # NOTE: before the heavy imports, so a config error answers at once
    from trainer.collectives import CollectiveError, exit_now, named_collective_failures
    from trainer.progress import setup_logging
    from trainer.train import Trainer

    trainer = Trainer(cfg)
    setup_logging(trainer.accelerator.is_main_process, args.debug)
    try:
        with named_collective_failures(
            trainer.accelerator.process_index, lambda: trainer.state.global_step, cfg.backend.collective_timeout_s
        ):
            record = trainer.fit()
    except CollectiveError as err:
        print(f"trainer: error: {err}", file=sys.stderr)
        exit_now(3)  # NOTE: no teardown: the process group's threads would abort the process
    finally:
        trainer.close()
    if trainer.accelerator.is_main_process:
        # The command's machine-readable result (README: "The result on stdout").
        print(json.dumps({k: v for k, v in record.items() if not hasattr(v, "shape")}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from trainer.evaluate import eval_command

    result = eval_command(cfg, args.checkpoint, args.output, args.confusion, args.debug, ema=args.ema)
    if result is not None:
        print(json.dumps(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import export_command

    return export_command(args)


def cmd_env(args: argparse.Namespace) -> int:
    from trainer.env import environment_report, format_environment

    report = environment_report(args.device, args.precision)
    print(json.dumps(report, indent=2) if args.json else format_environment(report))
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


def cmd_doctor(args: argparse.Namespace) -> int:
    from trainer.doctor import doctor_command

    return doctor_command(_load(args), args)


def cmd_convert(args: argparse.Namespace) -> int:
    from trainer.data.convert import convert_command

    return convert_command(_load(args), args)


def cmd_predict(args: argparse.Namespace) -> int:
    from trainer.predict import predict_command

    return predict_command(args)


def cmd_model_folder(args: argparse.Namespace) -> int:
    from trainer.run_model import model_folder_command

    return model_folder_command(args)


def cmd_import_args(args: argparse.Namespace) -> int:
    from trainer.import_args import import_args_command

    return import_args_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer", description="Train timm image classifiers on MLU, CUDA or CPU through Accelerate."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sections = "config sections and keys (override any as key.sub=value):\n" + describe_sections()
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("train", help="train a model", epilog=sections, formatter_class=fmt)
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint on the val split (the reference's -e)", epilog=sections, formatter_class=fmt
    )
    _config_args(p)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint or run directory, or a .safetensors file (model.safetensors, model_ema.safetensors)",
    )
    p.add_argument(
        "--ema",
        action="store_true",
        help="with a directory: evaluate its EMA weights (model_ema.safetensors) instead of the raw ones",
    )
    p.add_argument("--output", default=None, help="directory for eval.json and plots (default: RUN_DIR/eval)")
    p.add_argument(
        "--no-confusion", dest="confusion", action="store_false", help="skip the confusion matrix and per-class CSV"
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k classes of images (files, folders, globs), with names and probabilities")
    p.add_argument("model", help="a model folder (config.json + model.safetensors), a run or a checkpoint directory")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) or globs")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON document on stdout: predictions and skipped images")
    out.add_argument("--csv", action="store_true", help="CSV on stdout: image,rank,index,label,description,probability")
    p.add_argument("--ema", action="store_true", help="with a run or checkpoint: its EMA weights (RUN/model_ema/)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch on the device")
    p.add_argument("--workers", type=int, default=0, help="loader worker processes to decode images (0: this process)")
    p.add_argument("--device", default="auto", help="backend.device to run on")
    p.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"), help="train.precision to run at"
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="the val-time model as ONNX or TorchScript, with its input contract, checked")
    p.add_argument("model", help="a model folder, a run directory or a checkpoint directory")
    p.add_argument("--to", nargs="+", default=["onnx"], choices=("onnx", "torchscript"), help="formats (default: onnx)")
    p.add_argument("--output", default=None, help="directory for the files (default: MODEL/export)")
    p.add_argument("--ema", action="store_true", help="export the run's EMA weights")
    p.add_argument("--images", nargs="*", default=[], help="check on these images or folders, not the run's val split")
    p.add_argument("--samples", type=int, default=32, help="images in the check batch")
    p.add_argument("--exporter", default="auto", choices=EXPORTERS, help="torch.onnx exporter (auto: torch's default)")
    p.add_argument("--opset", type=int, default=0, help="ONNX opset (0: the exporter's default)")
    p.add_argument("--debug", action="store_true", help="log at debug level")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("env", help="print the resolved device, process group, precision and versions")
    p.add_argument("--device", default="auto", help="backend.device to resolve")
    p.add_argument("--precision", default="auto", help="train.precision to resolve")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser(
        "bench",
        help="measure model step, input pipeline and end to end; say which bounds training",
        epilog=sections,
        formatter_class=fmt,
    )
    _config_args(p)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement, after warm-up")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument(
        "--epoch",
        type=int,
        default=0,
        help="measure at this epoch's train size under input.train_size_schedule (epochs from 0)",
    )
    p.add_argument(
        "--json", default=None, help="also write the figures to this JSON file (default: RUN_DIR/bench.json)"
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "check-data",
        help="scan a dataset for unreadable files, label and class problems before a long run",
        epilog=sections,
        formatter_class=fmt,
    )
    _config_args(p)
    p.add_argument("--limit", type=int, default=0, help="check only the first N images of each split (0: all)")
    p.add_argument("--examples", type=int, default=5, help="example paths shown per problem")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser(
        "doctor",
        help="launch preflight under accelerate launch: devices, process "
        "group, all-reduce, data and output on every process",
        epilog=sections,
        formatter_class=fmt,
    )
    _config_args(p)
    p.add_argument(
        "--bandwidth-mb", type=int, default=100, help="all-reduce size per process for the bandwidth figure (0: skip)"
    )
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "convert",
        help="write the configured data as tar shards (wds) or parquet shards, and verify them",
        epilog=sections,
        formatter_class=fmt,
    )
    # NOTE: before the overrides, which take the positionals after it
    p.add_argument("out", help="output directory (new or empty)")
    _config_args(p)
    p.add_argument(
        "--to",
        required=True,
        choices=("wds", "parquet"),
        help="output format: WebDataset tar shards or HF parquet shards",
    )
    p.add_argument("--shard-size", type=int, default=1250, help="samples per shard")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "import-args",
        help="turn a `python main.py ...` (pytorch/examples imagenet) command line into a recipe and a launch command",
    )
    p.add_argument(
        "--device", default="auto", help="device to launch on; auto reads it from main.py's --dist-backend / --no-accel"
    )
    p.add_argument(
        "--devices", type=int, default=0, help="devices per machine under --multiprocessing-distributed (0: assume 8)"
    )
    p.add_argument(
        "--output",
        default=None,
        help="write the recipe here and print the launch command (default: the recipe to stdout)",
    )
    p.add_argument("main_py", nargs=argparse.REMAINDER, help="-- python main.py DIR -a resnet50 -b 128 ...")
    p.set_defaults(func=cmd_import_args)

    p = sub.add_parser(
        "model-folder",
        help="write RUN_DIR/model/ (and model_ema/), the timm / HF model folder, for a run from before they existed",
    )
    p.add_argument("run_dir", help="the run directory (holds config.yaml)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="take the weights from this checkpoint of the run (an unfinished run), not RUN_DIR/model.safetensors",
    )
    p.set_defaults(func=cmd_model_folder)

    p = sub.add_parser("plot", help="write PNG curves of a run to RUN_DIR/plots/")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("prepare-digits", help="write the demo's digits dataset as an ImageNet-layout folder")
    p.add_argument("root", nargs="?", default="~/.cache/trainer/digits")
    p.set_defaults(func=cmd_prepare_digits)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"trainer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training took SIGINT over (set-up), or in another command
        print("trainer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
