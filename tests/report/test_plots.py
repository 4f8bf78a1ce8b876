"""The trade-off plots: written, linked from the README, and named after the task and the metric."""

from __future__ import annotations

from fake_results import fake_runs, write_suite
from kdbench.report.readme import write_report


def test_plots_are_written_and_linked(suite_dir):
    text = write_report(suite_dir)
    for name in ("toy_accuracy_vs_latency.png", "toy_accuracy_vs_size.png"):
        path = suite_dir / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000
        assert f"]({name})" in text


def test_plot_names_are_slugs_of_the_metric_too(tmp_path):
    runs = fake_runs()
    for r in runs:
        for v in r["variants"]:
            v["metric_name"] = "exact match"
    text = write_report(write_suite(tmp_path / "s", runs))
    assert "](toy_exact-match_vs_latency.png)" in text and (tmp_path / "s" / "toy_exact-match_vs_size.png").exists()
