"""What the training loop moves between host and device, counted on the emulated MLU.

The emulated device counts every host<->device copy and every point where the host waits
for it (`torch.mlu.transfer_stats()`, tests/emulated_mlu). On a real accelerator each
sync drains the queue of launched kernels, so a sync in the hot loop costs throughput
that no test of results would notice. These tests pin the loop's traffic down: per
micro-batch only the uint8 images and their labels go to the device, and nothing comes
back, nor does the host wait, except where the loop reads the loss (log points).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import helpers

REPO = Path(__file__).resolve().parent.parent
EMULATED = REPO / "tests" / "emulated_mlu"
PROBE = REPO / "tests" / "device_traffic_probe.py"
BATCH, IMG_SIZE, LABEL_BYTES = 4, 32, 8  # labels are int64
pytestmark = pytest.mark.slow

COUNTERS_SCRIPT = """
import json, torch, torch_mlu
mlu, seen = torch.mlu, {}
def take(name, fn):
    mlu.reset_transfer_stats(); fn(); seen[name] = mlu.transfer_stats()
host = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
dev = host.to('mlu')
take('h2d_non_blocking', lambda: host.to('mlu', non_blocking=True))
take('h2d_blocking', lambda: host.to('mlu'))
take('compute', lambda: (dev.float() * 2).sum().add_(1).reshape(1))
take('item', lambda: dev.float().sum().item())
take('tolist', lambda: dev.float().sum(dim=(1, 2, 3)).tolist())
take('d2h', lambda: dev.cpu())
take('synchronize', lambda: mlu.synchronize())
take('torch_tensor', lambda: torch.tensor(3, device='mlu'))
take('full', lambda: torch.full((), 3, device='mlu'))
print(json.dumps(seen))
"""


def run_emulated(args: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MLU_VISIBLE_DEVICES", "CN_VISIBLE_DEVICES")}
    env.update(PYTHONPATH=f"{EMULATED}{os.pathsep}{REPO}", PYTHONUNBUFFERED="1")
    # NOTE: a device with torch's fused SGD, as CUDA is: there a loss-scaled step needs no host
    # sync, which these tests pin down. The published torch_mlu lines have no fused kernels
    # (tests/test_mlu_lines.py): on them GradScaler reads its inf check once per step.
    env["EMULATED_MLU_FUSED_KERNELS"] = "1"
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


def test_emulated_mlu_counts_copies_reads_and_syncs_but_not_its_own_staging():
    seen = json.loads(run_emulated(["-c", COUNTERS_SCRIPT]))
    nonzero = {name: {k: v for k, v in stats.items() if v} for name, stats in seen.items()}
    assert nonzero["h2d_non_blocking"] == {"h2d_copies": 1, "h2d_bytes": 384}
    assert nonzero["h2d_blocking"] == {"h2d_copies": 1, "h2d_bytes": 384, "h2d_blocking": 1, "syncs": 1}
    # Every op runs on host copies of its operands in the emulation; none of that is counted.
    assert nonzero["compute"] == {} and nonzero["full"] == {}
    assert nonzero["item"] == {"scalar_reads": 1, "d2h_bytes": 4, "syncs": 1}
    assert nonzero["tolist"] == {"d2h_copies": 1, "d2h_bytes": 8, "d2h_blocking": 1, "syncs": 1}
    assert nonzero["d2h"] == {"d2h_copies": 1, "d2h_bytes": 384, "d2h_blocking": 1, "syncs": 1}
    assert nonzero["synchronize"] == {"sync_calls": 1, "syncs": 1}
    # torch.tensor(x, device=...) is a host tensor copied over: a blocking copy, a sync.
    assert nonzero["torch_tensor"]["h2d_blocking"] == 1


# Each variant trains one epoch of 4 optimizer steps, logging every 2.
VARIANTS = {
    "fp16": ["train.precision=fp16"],
    "fp16_grad_accum": ["train.precision=fp16", "train.grad_accum_steps=2"],
    "fp16_channels_last": ["train.precision=fp16", "train.channels_last=true"],
    "fp32": ["train.precision=fp32"],
    "inject_sync": ["train.precision=fp16"],  # the probe adds a loss read to every step
}


@pytest.fixture(scope="module")
def traffic(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("traffic")
    data = helpers.make_image_folder(root / "data", train_per_class=12)  # 36 images: 9 batches
    cfg = {
        "model": {"name": "test_resnet"},
        "data": {"root": str(data)},
        "loader": {"batch_size_per_device": BATCH, "workers": 0, "normalize_on_device": True},
        "input": {"img_size": IMG_SIZE},
        "train": {"epochs": 1, "log_every_steps": 2, "max_steps_per_epoch": 4},
        "output": {"dir": str(root / "runs"), "plots": False},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    variants = {name: [*overrides, f"output.run_name={name}"] for name, overrides in VARIANTS.items()}
    return json.loads(run_emulated([str(PROBE), str(root / "tiny.yaml"), json.dumps(variants)]))


def hot_loop_waits(intervals: list[dict]) -> list[int]:
    """Indices of the intervals between micro-batches that copied back or synced without a log point."""
    between = intervals[:-1]  # the last one holds the epoch's end (reduce, checks)
    return [i for i, it in enumerate(between) if not it["log"] and (it["syncs"] or it["d2h_copies"] or it["d2h_bytes"])]


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "inject_sync"])
def test_a_micro_batch_copies_only_its_uint8_images_and_labels(traffic, name):
    result = traffic[name]
    assert result["image_bytes"] == 3 * IMG_SIZE * IMG_SIZE
    batch_bytes = BATCH * (result["image_bytes"] + LABEL_BYTES)
    intervals = result["intervals"]
    # Interval i holds the copy of micro-batch i+1 (the loader places it before it is used).
    for it in intervals[:-1]:
        assert (it["h2d_copies"], it["h2d_bytes"], it["h2d_blocking"]) == (2, batch_bytes, 0), (name, it)
    # train_step itself moves nothing and never waits: not the loss scaler, accumulation,
    # channels_last, the metrics nor the non-finite counter.
    for it in intervals[1:]:
        assert not any(it["step_only"].values()), (name, it["step_only"])


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "inject_sync"])
def test_the_host_waits_for_the_device_only_at_log_points(traffic, name):
    intervals = traffic[name]["intervals"]
    assert hot_loop_waits(intervals) == [], (name, intervals)
    logs = [it for it in intervals if it["log"]]
    assert len(logs) == 2 and all(it["syncs"] >= 1 for it in logs)  # steps 2 and 4; the counters do see them


def test_the_counts_do_not_depend_on_scaler_accumulation_or_channels_last(traffic):
    def per_micro_batch(name: str) -> tuple:
        intervals = traffic[name]["intervals"]
        waits = sum(it["syncs"] for it in intervals[:-1] if not it["log"])
        return frozenset((it["h2d_copies"], it["h2d_bytes"]) for it in intervals[:-1]), waits

    assert traffic["fp16"]["scaler"] and traffic["fp16"]["fused"] and not traffic["fp32"]["scaler"]
    assert len(traffic["fp16_grad_accum"]["intervals"]) == 2 * len(traffic["fp16"]["intervals"]) - 1
    assert len({per_micro_batch(name) for name in VARIANTS if name != "inject_sync"}) == 1


def test_a_sync_added_to_the_hot_loop_is_caught(traffic):
    assert len(hot_loop_waits(traffic["inject_sync"]["intervals"])) >= 2


def test_trainer_bench_reports_the_traffic_per_step(tmp_path):
    data = helpers.make_image_folder(tmp_path / "data", train_per_class=8)
    cfg = {
        "model": {"name": "test_resnet"},
        "data": {"root": str(data)},
        "loader": {"batch_size_per_device": BATCH, "workers": 0},
        "input": {"img_size": IMG_SIZE},
        "train": {"precision": "fp16"},
        "output": {"dir": str(tmp_path / "runs"), "run_name": "bench"},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "bench.json"
    run_emulated(
        [
            "-m",
            "trainer",
            "bench",
            "--config",
            str(tmp_path / "tiny.yaml"),
            "--steps",
            "2",
            "--warmup",
            "1",
            "--json",
            str(out),
        ]
    )
    per_step = json.loads(out.read_text())["traffic_per_step"]
    assert per_step["h2d_copies"] == 2 and per_step["h2d_bytes"] == BATCH * (3 * IMG_SIZE * IMG_SIZE + LABEL_BYTES)
    assert per_step["syncs"] == per_step["d2h_copies"] == per_step["h2d_blocking"] == 0


def test_two_processes_wait_only_at_log_points(tmp_path):
    # 12 optimizer steps logging every 6: a stop agreement or a DDP wait every few steps
    # (the loop agreed every 10 steps before) shows between the log points.
    data = helpers.make_image_folder(tmp_path / "data", train_per_class=20)  # 60 images: 15 batches of 2 per process
    cfg = {
        "model": {"name": "test_resnet"},
        "data": {"root": str(data)},
        "loader": {"batch_size_per_device": 2, "workers": 0},
        "input": {"img_size": IMG_SIZE},
        "train": {"epochs": 1, "log_every_steps": 6, "max_steps_per_epoch": 12, "precision": "fp16"},
        "output": {"dir": str(tmp_path / "runs"), "plots": False},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    launch = [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / "accelerate" / "mlu_2card.yaml"),
        "--main_process_port",
        str(helpers.free_port()),
    ]
    result = json.loads(
        run_emulated([*launch, str(PROBE), str(tmp_path / "tiny.yaml"), json.dumps({"two": ["output.run_name=two"]})])
    )["two"]
    intervals = result["intervals"]
    # NOTE: DDP rebuilds its gradient buckets once, in the second iteration's forward: the
    # bucket indices go to the device, are broadcast and read back (2 blocking copies). It
    # is DDP's, once per run; any other wait between log points fails here.
    assert len(intervals) == 13 and hot_loop_waits(intervals) == [2], intervals
    rebuild = intervals[2]["step_only"]
    assert (rebuild["d2h_blocking"], rebuild["scalar_reads"], rebuild["h2d_blocking"]) == (2, 0, 0), rebuild
    for i, it in enumerate(intervals[:-1]):
        if i != 2 and not it["log"]:  # a log point also sends the stop flags (16 B)
            assert (it["h2d_copies"], it["h2d_bytes"]) == (2, 2 * (3 * IMG_SIZE * IMG_SIZE + LABEL_BYTES)), it
