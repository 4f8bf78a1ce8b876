"""The README of a results folder: its failed runs, and write_report as the runner calls it."""

from __future__ import annotations

from fake_results import fake_runs
from kdbench.report.readme import render, write_report


def test_failed_run_is_listed():
    text = render(fake_runs(), "toy")
    assert "## Failed runs" in text
    assert "`toy__tiny__kd__s2` (bug): RuntimeError: boom" in text
    assert "from 5 ok runs (1 failed)" in text
    only_failed = render(fake_runs()[-1:], "toy")  # no table, but still where it ran and why it failed
    assert "- device: cpu (Fake CPU)" in only_failed and "RuntimeError: boom" in only_failed


def test_write_report_keeps_the_runner_signature(suite_dir):
    text = write_report(suite_dir, suite_name="toy-suite-name")
    assert text.startswith("# kdbench results: toy-suite-name")
    assert (suite_dir / "README.md").read_text() == text
    assert "- device: cpu (Fake CPU), torch threads 2 of 2 CPUs" in text
    assert "- runs made: 2026-01-02 03:04 to 2026-01-02 03:04 UTC" in text
