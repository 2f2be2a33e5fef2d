"""EpochTally: one epoch's training figures, summed on the device and carried across a mid-epoch resume.

The loop adds each micro-batch's loss, top-1 and image count to a window on the device; the
window is folded into the epoch's sums at log points (the loop's one host read). A
checkpoint taken mid-epoch stores the sums so far, added up over all processes
(`snapshot`, one collective, at a point where every process is saving anyway); a run
resumed from it starts the epoch's sums from there, so the epoch's `train_loss`,
`train_top1`, `train_samples`, `skipped` and `grad_norm` are those of the whole epoch, the
same as an uninterrupted run's, not those of its last part.
"""

from __future__ import annotations

from typing import Any

from trainer.loop.clip import GradClip
from trainer.metrics import RunningSums, reduce_sums

SUMS = ("loss", "top1", "n")  # what the training loop adds up on the device
NORM_KEYS = ("grad_norm_sum", "grad_norm_steps")  # GradClip's sums, under their names in a snapshot


class EpochTally:
    """The current epoch's sums: `window` since the last log point, `sums` before it, the skipped count."""

    def __init__(self, accelerator: Any, clip: GradClip | None) -> None:
        self.accelerator, self.clip = accelerator, clip
        self.sums, self.window = RunningSums(accelerator.device, SUMS), RunningSums(accelerator.device, SUMS)
        self.skipped = 0
        self.carried_n = 0.0  # images (all processes) counted before the resume: not timed by this run

    def start(self, carried: dict[str, float]) -> None:
        """A new epoch, or the rest of one: `carried` is the snapshot its checkpoint stored ({} for none).

        The totals are all-process sums, so the main process alone takes the counts back (the
        end of the epoch adds every process's sums again). The float sums go on from their
        compensated pairs: each process from its own when the process count is the checkpoint's
        (the epoch then ends bit for bit as an uninterrupted one), else the main process from
        their sum. The clip norms are the same on every process (norms of the all-reduced
        gradients), so each takes them back.
        """
        self.sums.reset()
        self.window.reset()
        self.skipped, self.carried_n = 0, carried.get("n", 0.0)
        if self.clip:
            self.clip.reset()
            if carried:
                norms = dict(zip(self.clip.norms.names, (carried.get(k, 0.0) for k in NORM_KEYS)))
                self.clip.norms.load({**norms, **_unprefixed(carried, "clip:")})
        if not carried:
            return
        acc = self.accelerator
        own = _unprefixed(carried, f"kahan:{acc.process_index}:")
        if carried.get("kahan_processes") == acc.num_processes:
            counts = {name: carried.get(name, 0.0) for name in SUMS} if acc.is_main_process else {}
            self.sums.load({**{name: 0.0 for name in SUMS}, **counts, **own})
        elif acc.is_main_process:
            self.sums.load({name: value for name, value in carried.items() if not name.startswith("kahan:")})
        if acc.is_main_process:
            self.skipped = int(carried["skipped"])

    def read_window(self) -> dict[str, float]:
        """The window's totals (reads the device: log points only), then the window folded into the epoch's sums."""
        window = self.window.totals()
        self._fold()
        return window

    def _fold(self) -> None:
        self.sums.fold(self.window)
        self.window.reset()

    def snapshot(self) -> dict[str, float]:
        """The epoch's sums so far over all processes, for a checkpoint; every process must call it."""
        self._fold()
        totals = reduce_sums(self.accelerator, self.sums, self.skipped)
        totals.update(self._reduced_kahan_state())
        if self.clip:
            totals.update(zip(NORM_KEYS, self.clip.norms.totals().values()))
        return totals

    def _reduced_kahan_state(self) -> dict[str, float]:
        """The compensated pairs of the float sums, for the carry: their sum over processes, each
        process's own (`kahan:<process>:...`, for a resume on as many processes), and the clip
        norms' (`clip:...`, the same on every process)."""
        import torch

        carry = {f"clip:{k}": v for k, v in self.clip.norms.kahan_state().items()} if self.clip else {}
        state = self.sums.kahan_state()
        if not state:
            return carry
        values = torch.tensor(list(state.values()), dtype=torch.float32, device=self.accelerator.device)
        gathered = self.accelerator.gather(values).reshape(self.accelerator.num_processes, -1).tolist()
        carry["kahan_processes"] = self.accelerator.num_processes
        for process, row in enumerate(gathered):
            carry.update({f"kahan:{process}:{name}": value for name, value in zip(state, row)})
        summed = torch.tensor(gathered, dtype=torch.float64).sum(dim=0).tolist()
        return {**carry, **dict(zip(state, summed))}

    def epoch_metrics(self, elapsed_s: float) -> tuple[dict[str, float], dict[str, float]]:
        """(the epoch's train metrics, the snapshot they come from); every process must call it."""
        totals = self.snapshot()
        n = max(totals["n"], 1)
        metrics = {
            **({"grad_norm": self.clip.mean_norm()} if self.clip else {}),
            "train_loss": totals["loss"] / n,
            "train_top1": totals["top1"] / n,
            "img_per_s": (totals["n"] - self.carried_n) / max(elapsed_s, 1e-9),
            "epoch_time_s": elapsed_s,
            "skipped": int(totals["skipped"]),
            "train_samples": int(totals["n"]),
        }
        return metrics, totals


def _unprefixed(carried: dict[str, float], prefix: str) -> dict[str, float]:
    return {name[len(prefix) :]: value for name, value in carried.items() if name.startswith(prefix)}
