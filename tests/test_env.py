"""Tests for trainer.env: the report `trainer env` prints, as JSON and as a table."""

from __future__ import annotations

from trainer.env import environment_report, format_environment, package_version


def test_environment_report_has_the_picture():
    report = environment_report("cpu", "fp32")
    for key in (
        "device_type",
        "device_count",
        "visible_devices",
        "process_group_backend",
        "distributed_type",
        "precision",
        "versions",
        "warnings",
    ):
        assert key in report
    assert report["process_group_backend"] == "gloo" and report["precision"] == "fp32"
    assert set(report["versions"]) >= {"torch", "torch_mlu", "accelerate", "timm", "datasets"}


def test_the_table_reads_without_python_reprs():
    text = format_environment(environment_report("cpu", "fp32"))
    assert "1 process, not distributed" in text and "fp32 (native bf16:" in text
    assert "{" not in text and "None" not in text  # no dict or None reprs
    assert "torch_mlu" in text


def test_versions_without_importing():
    assert package_version("no_such_package_here") is None
    assert package_version("pytest")  # imported: its __version__
