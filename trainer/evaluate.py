"""evaluate: val loss, top-1 and top-5 over every val image exactly once, on any number of processes."""

from __future__ import annotations

from typing import Any, Callable

import torch
from accelerate.utils import broadcast

from trainer.metrics import RunningSums, topk_correct


@torch.no_grad()
def evaluate(accelerator: Any, model: torch.nn.Module, loader: Any, normalize: Callable[[torch.Tensor], torch.Tensor],
             record_skipped: Callable[[list[str]], int], num_classes_for_confusion: int = 0) -> dict[str, Any]:
    """Validate `model` on `loader`, which shards the val images across processes without padding.

    Per-process sums (and the skipped count) are reduced once at the end, so the figures
    are exact whatever the number of processes; `num_classes_for_confusion` > 0 also
    returns the confusion matrix (true class x predicted class, on the CPU).
    """
    acc = accelerator
    model = acc.unwrap_model(model)  # NOTE: no DDP collectives, so uneven shards are fine
    if acc.num_processes > 1:
        # DDP syncs buffers at the start of each forward, so after the last step each
        # process holds BatchNorm statistics of its own batch: validate rank 0's, the
        # ones that are exported and checkpointed.
        for buffer in model.buffers():
            buffer.copy_(broadcast(buffer.clone(), from_process=0))
    model.eval()
    sums = RunningSums(acc.device, ("loss", "top1", "top5", "n"))
    k = num_classes_for_confusion
    confusion = torch.zeros(k * k, dtype=torch.int64, device=acc.device) if k else None
    skipped = 0
    for batch in loader:
        if batch["skipped"]:
            skipped += record_skipped(batch["skipped"])
        labels = batch["labels"]
        if labels.numel() == 0:
            continue
        with acc.autocast():
            logits = model(normalize(batch["images"]))
            loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        top1, top5 = topk_correct(logits, labels, (1, 5))
        sums.add(loss, top1.sum(), top5.sum(), torch.tensor(labels.numel(), device=labels.device))
        if confusion is not None:
            confusion += torch.bincount(labels * k + logits.argmax(1), minlength=k * k)
    model.train()
    local = torch.cat([sums.values, torch.tensor([skipped], dtype=sums.values.dtype, device=acc.device)])
    totals = dict(zip((*sums.names, "skipped"), acc.reduce(local, "sum").tolist()))
    n = max(totals["n"], 1)
    result = {"val_loss": totals["loss"] / n, "val_top1": totals["top1"] / n, "val_top5": totals["top5"] / n,
              "val_samples": int(totals["n"]), "val_skipped": int(totals["skipped"])}
    if confusion is not None:
        result["confusion"] = acc.reduce(confusion, "sum").view(k, k).cpu()
    return result
