"""Tests for trainer.metrics: top-k hits, running sums, and the metrics.jsonl / metrics.csv writer."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from trainer.metrics import METRIC_KEYS, MetricsWriter, RunningSums, topk_correct


def test_topk_correct_per_sample_hits():
    logits = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.02, 0.0, 0.0],  # label 0: top-1
            [0.1, 0.5, 0.3, 0.05, 0.04, 0.01],  # label 2: second, so top-5 only
            [0.5, 0.2, 0.1, 0.09, 0.08, 0.03],  # label 5: last, neither
        ]
    )
    top1, top5 = topk_correct(logits, torch.tensor([0, 2, 5]))
    assert top1.tolist() == [True, False, False]
    assert top5.tolist() == [True, True, False]
    assert top1.dtype == torch.bool and top1.shape == (3,)


def test_topk_correct_with_k_larger_than_the_number_of_classes():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.3, 0.2, 0.5]])
    labels = torch.tensor([0, 1])
    top1, top5 = topk_correct(logits, labels)  # 3 classes: top-5 means any class
    assert top1.tolist() == [False, False]
    assert top5.tolist() == [True, True]
    (top2,) = topk_correct(logits, labels, ks=(2,))
    assert top2.tolist() == [True, False]


def test_running_sums_accumulate_and_reset():
    sums = RunningSums(torch.device("cpu"), ("loss", "correct", "count"))
    sums.add(torch.tensor(1.5), torch.tensor(3), torch.tensor(4))
    sums.add(torch.tensor(0.25, dtype=torch.bfloat16), torch.tensor(1.0), torch.tensor(4, dtype=torch.int64))
    assert sums.totals() == {"loss": 1.75, "correct": 4.0, "count": 8.0}
    assert sums.counts.dtype == torch.int64 and sums.floats.dtype == torch.float32  # no float64: not on an MLU
    sums.reset()
    assert sums.totals() == {"loss": 0.0, "correct": 0.0, "count": 0.0}


def test_running_sums_stay_exact_without_float64():
    # An MLU computes float64 as float32: a float64 count stops at 2**24 there. Counts are
    # int64, and the float sums compensated, so neither depends on float64 on the device.
    sums = RunningSums(torch.device("cpu"), ("loss", "top1", "n"))
    sums.load({"loss": 0.0, "top1": 2.0**24, "n": 2.0**24})
    sums.add(torch.tensor(0.1), torch.tensor(1), torch.tensor(1))
    assert sums.totals()["n"] == 2**24 + 1 and sums.totals()["top1"] == 2**24 + 1
    drift = RunningSums(torch.device("cpu"), ("loss",))
    for _ in range(20_000):
        drift.add(torch.tensor(0.1))
    # plain float32 accumulation of 20k x 0.1 ends at 1999.66; compensated, at float32's rounding of 2000
    assert abs(drift.totals()["loss"] - 2000.0) < 1e-3


def test_running_sums_do_not_keep_the_autograd_graph():
    sums = RunningSums(torch.device("cpu"), ("loss",))
    w = torch.tensor(2.0, requires_grad=True)
    sums.add(w * 3)
    assert not sums.floats.requires_grad


def record(epoch: int, **extra) -> dict:
    base = {k: None for k in METRIC_KEYS}
    base.update(
        epoch=epoch,
        step=epoch * 10,
        train_loss=1.0 / (epoch + 1),
        train_top1=0.5,
        val_loss=0.9,
        val_top1=0.6,
        val_top5=0.9,
        lr=0.1,
        img_per_s=123.4,
        epoch_time_s=5.0,
        train_samples=100,
        val_samples=20,
        skipped=0,
    )
    base.update(extra)
    return base


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_writer_appends_jsonl_and_csv_that_agree(tmp_path):
    writer = MetricsWriter(tmp_path)
    records = [record(0), record(1, val_loss=None, val_top1=None, val_top5=None), record(2, extra_key="kept in jsonl")]
    for r in records:
        writer.write(r)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = read_csv(tmp_path / "metrics.csv")
    assert len(lines) == len(rows) == 3
    assert list(rows[0]) == list(METRIC_KEYS)  # header once, in the documented order
    assert (tmp_path / "metrics.csv").read_text().count("epoch,step") == 1
    for line, row, original in zip(lines, rows, records):
        parsed = json.loads(line)
        assert parsed == original
        for key in METRIC_KEYS:
            if parsed[key] is None:
                assert row[key] == ""
            elif isinstance(parsed[key], float):
                assert float(row[key]) == parsed[key]
            else:
                assert row[key] == str(parsed[key])
    assert json.loads(lines[2])["extra_key"] == "kept in jsonl"


def test_a_new_writer_appends_to_existing_files(tmp_path):
    MetricsWriter(tmp_path).write(record(0))
    MetricsWriter(tmp_path).write(record(1))  # a resumed run
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert [r["epoch"] for r in read_csv(tmp_path / "metrics.csv")] == ["0", "1"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_written_as_null(tmp_path, bad):
    MetricsWriter(tmp_path).write(record(0, train_loss=bad))
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert parsed["train_loss"] is None and parsed["lr"] == 0.1
    assert read_csv(tmp_path / "metrics.csv")[0]["train_loss"] == ""


def test_a_line_left_without_newline_is_not_glued_to_the_next(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record(0)) + "\n" + '{"epoch": 1, "train_lo')  # killed mid-write
    MetricsWriter(tmp_path).write(record(1))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert lines[1] == '{"epoch": 1, "train_lo'
    assert json.loads(lines[0])["epoch"] == 0 and json.loads(lines[2]) == record(1)
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")


def test_empty_existing_files_get_a_csv_header(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "metrics.csv").write_text("")
    MetricsWriter(tmp_path).write(record(3))
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    assert [r["epoch"] for r in read_csv(tmp_path / "metrics.csv")] == ["3"]


def test_a_csv_row_left_without_newline_is_not_glued_to_the_next(tmp_path):
    MetricsWriter(tmp_path).write(record(0))
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("1,10,0.5")  # killed mid-row
    MetricsWriter(tmp_path).write(record(2))
    rows = read_csv(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert rows[2]["val_top5"] == "0.9" and rows[2]["step"] == "20"


def test_sums_loaded_with_their_kahan_state_continue_bit_for_bit():
    """A resumed epoch's sums go on exactly as the uninterrupted ones (the carry of a mid-epoch checkpoint)."""
    generator = torch.Generator().manual_seed(3)  # NOTE: a seed whose rounded totals alone would go on differently
    values = (torch.rand(400, generator=generator) * 3).tolist()
    straight = RunningSums(torch.device("cpu"), ("loss", "n"))
    for v in values[:250]:
        straight.add(torch.tensor(v), torch.tensor(1))
    resumed = RunningSums(torch.device("cpu"), ("loss", "n"))
    resumed.load({**straight.totals(), **straight.kahan_state()})
    for v in values[250:]:
        straight.add(torch.tensor(v), torch.tensor(1))
        resumed.add(torch.tensor(v), torch.tensor(1))
    assert resumed.totals() == straight.totals() and straight.totals()["n"] == 400
