"""Runs on the emulated MLU (a subprocess of tests/test_device_traffic.py): records the host<->device
traffic of `Trainer.train_epoch`, interval by interval, for several configs in one process.

Usage: [accelerate launch ...] python device_traffic_probe.py CONFIG.yaml VARIANTS.json, where VARIANTS maps a name to a
list of `section.key=value` overrides. Prints one JSON object: name -> {"intervals": [...],
"batch_bytes": ...}. Interval 0 runs from the start of the epoch to the first micro-batch's
`train_step`, interval i from micro-batch i's `train_step` to the next one's (the loop's work
after the step and the loader's next batch included), the last to the end of the epoch. Each
holds the counters' differences, "step_only": those of the `train_step` that opens it alone
(None for interval 0), and "log": whether
the loop read the loss (its log point) in that interval.
"""

from __future__ import annotations

import json
import sys

from accelerate.state import AcceleratorState, GradientState

from trainer.config import load_config
from trainer.traffic import traffic_delta
from trainer.train import Trainer


def record_epoch(trainer: Trainer, inject_sync: bool) -> list[dict]:
    stats = trainer.backend.transfer_stats
    intervals: list[dict] = []
    mark = {"at": stats(), "log": False, "step_only": None}
    step, read_window = trainer.train_step, trainer._read_window

    def close_interval() -> None:
        now = stats()
        intervals.append({**traffic_delta(mark["at"], now), "log": mark["log"], "step_only": mark["step_only"]})
        mark.update(at=now, log=False, step_only=None)

    def recorded_step(batch, sums, *place):
        close_interval()
        before = stats()
        updated = step(batch, sums, *place)
        if inject_sync:  # the regression the test must catch: a loss read every step
            sums.floats.sum().item()
        mark["step_only"] = traffic_delta(before, stats())
        return updated

    def recorded_read(*args):
        mark["log"] = True
        return read_window(*args)

    trainer.train_step, trainer._read_window = recorded_step, recorded_read
    trainer.train_epoch(0)
    close_interval()
    return intervals


def main() -> None:
    config, variants = sys.argv[1], json.loads(sys.argv[2])
    results = {}
    for name, overrides in variants.items():
        cfg = load_config(config, overrides)
        trainer = Trainer(cfg)
        trainer.run.prepare()
        # The step's "step_only" deltas of the first micro-batch start after this reset.
        trainer.backend.reset_transfer_stats()
        intervals = record_epoch(trainer, inject_sync=name.startswith("inject"))
        _, height, width = trainer.data.data_config["input_size"]
        results[name] = {
            "intervals": intervals,
            "image_bytes": 3 * height * width,
            "batch": cfg.loader.batch_size_per_device,
            "scaler": trainer.accelerator.scaler is not None,
            "fused": bool(trainer.optimizer.optimizer.defaults.get("fused")),
        }
        main = trainer.accelerator.is_main_process
        trainer.close()
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    if main:  # under `accelerate launch`, rank 0 speaks for all
        print(json.dumps(results))


if __name__ == "__main__":
    main()
