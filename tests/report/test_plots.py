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


def test_the_x_axis_is_logarithmic_past_a_tenfold_spread():
    from kdbench.report.plots import x_scale

    assert x_scale([4.0, 40.0]) == "linear"  # exactly 10x still reads on a linear axis
    assert x_scale([4.0, 41.0]) == "log"
    assert x_scale([0.0, 100.0]) == "linear"  # nothing to take the log of


def test_the_teacher_is_marked_and_the_axis_follows_the_spread():
    from kdbench.report.plots import tradeoff_figure
    from kdbench.report.rows import collect_rows, latency_of

    runs = fake_runs()
    rows = collect_rows(runs)["toy"]
    fig = tradeoff_figure(rows, latency_of("8"), "latency", "toy")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts].count("teacher") == 1
    assert ax.get_xscale() == "linear"  # the fake teacher is 10x the fastest student: not more
    for r in runs:  # a teacher 100x slower than the fastest student
        for v in r["variants"]:
            if v["kind"] == "teacher":
                v["latency"]["8"]["median_ms"] = 400.0
    fig = tradeoff_figure(collect_rows(runs)["toy"], latency_of("8"), "latency", "toy")
    assert fig.axes[0].get_xscale() == "log"
