"""`trainer doctor`: a launch preflight, run under `accelerate launch` with the training config.

Checks in seconds what would otherwise fail an hour into a multi-process run, on every
process, and prints one table (process 0) and the first failure:

1. the device each process got, the count it sees, its visible-device variables and the
   precision `train.precision` resolves to;
2. the process group forms within `backend.collective_timeout_s`; an all-reduce of known
   values sums right on every process; all-reduce bandwidth of a ResNet50-sized gradient;
3. `data.root` is readable with the same class list everywhere (a node without the data);
4. `output.dir` is writable and the same directory for all (a node-local path);
5. the pitfalls `trainer env` warns about;
<<<<<<< HEAD
6. the device stack (`backend.device_stack_rows`): the plugin's torch line (torch_mlu's),
   torch and plugin versions that belong together, the loss scaler's class, fused optimizer
   kernels, the collective error-handling variables in force, bf16; one row each.
=======
6. the batch plan: per device x processes x accumulation, derived for this launch when
   `loader.global_batch_size` is set (or the count that does not divide it).
>>>>>>> issue19a

NOTE: every check catches its own errors and only records them, and the processes meet
only at fixed points, so a failing process never leaves the others waiting.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from trainer.backend import BackendError, create_accelerator, device_count, device_stack_rows, pitfalls, visible_devices
from trainer.config import Config, ConfigError
from trainer.data.readers import DataError
from trainer.data.sources import create_reader
from trainer.global_batch import plan_batch

BANDWIDTH_MB = 100  # a ResNet50 gradient: 25.6 M float32 parameters


def _data_check(cfg: Config) -> dict[str, Any]:
    """This process's view of data.root: class count and a digest of the class list."""
    root = Path(cfg.data.root).expanduser()
    if cfg.data.source == "folder" and not root.exists() and cfg.data.create_if_missing:
        return {
            "ok": True,
            "classes": 0,
            "digest": "",
            "note": f"{root} absent: the run writes {cfg.data.create_if_missing} there",
        }
    try:
        reader = create_reader(cfg.data, cfg.data.train_split)
        classes = list(reader.classes)
        val_split = cfg.data.val_split or ("val" if cfg.data.source == "folder" else "validation")
        create_reader(cfg.data, val_split, classes=classes)
    except (DataError, OSError, ValueError) as err:
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        seen_from = "" if root.is_absolute() else f" (relative to {os.getcwd()})"
        return {"ok": False, "error": (text if text.startswith("data.root") else f"data.root: {text}") + seen_from}
    digest = hashlib.sha256("\n".join(map(str, classes)).encode()).hexdigest()[:12]
    return {"ok": True, "classes": len(classes), "digest": digest}


def _output_probe(cfg: Config, token: str) -> dict[str, Any]:
    """Write a probe file in output.dir; the main process's probe is what the others look for."""
    out = Path(cfg.output.dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".doctor-{token}-{os.getpid()}"
        probe.write_text(socket.gethostname())
        probe.unlink()
        return {"ok": True, "path": str(out.resolve())}
    except OSError as err:
        return {"ok": False, "error": f"output.dir: cannot write {out} ({err.strerror or err})"}


def _bandwidth(acc: Any, backend: Any, megabytes: int) -> float:
    """All-reduce bus bandwidth in GB/s for `megabytes` of float32 per process."""
    import torch.distributed as dist

    x = torch.ones(megabytes * 2**20 // 4, device=acc.device)
    dist.all_reduce(x)  # warm-up: connections, buffers
    backend.synchronize()
    repeats, start = 3, time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(x)
    backend.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    n = acc.num_processes
    return 2 * (n - 1) / n * x.numel() * 4 / seconds / 1e9


def run_checks(cfg: Config, bandwidth_mb: int) -> tuple[list[dict[str, Any]], list[str], bool]:
    """Every check on this process; returns (all processes' rows, failures, is main process)."""
    from accelerate.utils import broadcast_object_list, gather_object

    start = time.perf_counter()
    acc, backend = create_accelerator(
        cfg.backend.device, cfg.train.precision, "release", cfg.backend.collective_timeout_s
    )
    row: dict[str, Any] = {
        "rank": acc.process_index,
        "host": socket.gethostname(),
        "device": str(acc.device),
        "count": device_count(backend.device_type),
        "visible": visible_devices(backend.device_type) or "-",
        "precision": "fp32" if backend.mixed_precision == "no" else backend.mixed_precision,
        "group_s": time.perf_counter() - start,
        "problems": [],
    }
    row["stack"] = device_stack_rows(backend.device_type, acc, cfg.train.precision)
    row["problems"] += [r["problem"] for r in row["stack"] if r["problem"]]
    n = acc.num_processes
    if n > 1:
        import torch.distributed as dist

        known = torch.tensor([acc.process_index + 1.0, 1.0], device=acc.device)
        dist.all_reduce(known)
        expected = [n * (n + 1) / 2, float(n)]
        if known.cpu().tolist() != expected:
            row["problems"].append(f"all-reduce of known values gave {known.cpu().tolist()}, expected {expected}")
        row["allreduce_GBps"] = _bandwidth(acc, backend, bandwidth_mb) if bandwidth_mb else 0.0
    data = _data_check(cfg)
    row["classes"] = data.get("classes", "-")
    row["class_digest"] = data.get("digest", "")
    if not data["ok"]:
        row["problems"].append(data["error"])
    token = (
        broadcast_object_list([uuid.uuid4().hex if acc.is_main_process else None], from_process=0)[0]
        if n > 1
        else uuid.uuid4().hex
    )
    out = _output_probe(cfg, token)
    marker = Path(cfg.output.dir).expanduser() / f".doctor-{token}"
    if out["ok"] and acc.is_main_process:
        marker.write_text("")
    acc.wait_for_everyone()
    if out["ok"] and not acc.is_main_process and not marker.exists():
        out = {
            "ok": False,
            "error": f"output.dir: {cfg.output.dir} is not the directory process 0 "
            "writes to (a node-local path?); use a shared filesystem",
        }
    acc.wait_for_everyone()
    if acc.is_main_process:
        marker.unlink(missing_ok=True)
    if not out["ok"]:
        row["problems"].append(out["error"])
    row["output_dir"] = out.get("path", "-")
    row["problems"] += [f"pitfall: {p}" for p in pitfalls(backend.device_type)]
    rows = gather_object([row]) if n > 1 else [row]
    failures = [f"process {r['rank']} ({r['host']}): {p}" for r in rows for p in r["problems"]]
    digests = {r["class_digest"] for r in rows if r["class_digest"]}
    if len(digests) > 1:
        failures.append(
            "data.root: the processes see different class lists ("
            + ", ".join(f"process {r['rank']}: {r['classes']} classes" for r in rows)
            + ")"
        )
    acc.end_training()
    return rows, failures, acc.is_main_process


def batch_check(cfg: Config, processes: int) -> tuple[str, str]:
    """("batch: <per device x processes x accumulation = global>", "") for `processes`, or ("", the failure)."""
    try:
        plan = plan_batch(
            global_batch_size=cfg.loader.global_batch_size,
            per_device=cfg.loader.batch_size_per_device,
            processes=processes,
            grad_accum_steps=cfg.train.grad_accum_steps,
            source=cfg.source,
        )
    except ConfigError as err:
        return "", str(err)
    return f"batch: {plan.describe()}", ""


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = (
        "rank",
        "host",
        "device",
        "count",
        "visible",
        "precision",
        "group_s",
        "allreduce_GBps",
        "classes",
        "output_dir",
    )
    cells = [[c for c in columns]] + [[_cell(r.get(c, "-")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def format_stack(stack: list[dict[str, str]]) -> str:
    """Process 0's device stack, one row a check: name, what was found, ok or FAIL."""
    width = max(len(r["check"]) for r in stack)
    return "\n".join(f"{r['check'].ljust(width)}  {'FAIL' if r['problem'] else 'ok  '}  {r['value']}" for r in stack)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def doctor_command(cfg: Config, args: Any) -> int:
    """Run every check; 0 when all pass, 1 naming the first failure (on every process)."""
    from trainer.collectives import CollectiveError, exit_now, named_collective_failures

    rank = int(os.environ.get("RANK", "0"))
    try:
        with named_collective_failures(rank, lambda: 0, cfg.backend.collective_timeout_s):
            rows, failures, main = run_checks(cfg, args.bandwidth_mb)
    except BackendError as err:
        sys.stdout.write(f"trainer doctor: FAIL: process {rank}: {err}\n")
        sys.stdout.flush()
        return 1
    except CollectiveError as err:
        sys.stdout.write(f"trainer doctor: FAIL: {err}\n")
        exit_now(1)
    batch, batch_failure = batch_check(cfg, len(rows))  # the accumulation derived for this launch's process count
    failures += [batch_failure] if batch_failure else []
    lines = []
    if main:
        lines += [format_table(rows), *([batch] if batch else []), "", format_stack(rows[0]["stack"]), ""]
        lines.append(f"trainer doctor: {len(rows)} process(es) checked, {len(failures)} problem(s)")
        lines += [f"  also: {failure}" for failure in failures[1:]]
    if failures:
        lines.append(f"trainer doctor: FAIL: {failures[0]}")
    elif main:
        lines.append("trainer doctor: OK")
    # NOTE: one write per process: the processes share the launcher's stdout, and
    # print() writes the text and its newline separately, so lines would interleave.
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()
    return 1 if failures else 0
