"""What to ship: the recommendation within tolerance, the fastest pick by paired speedup, and the Pareto front."""

from __future__ import annotations

import copy
import re
import statistics

from fake_results import fake_runs
from kdbench.report.picks import pareto_front, recommend
from kdbench.report.readme import render
from kdbench.report.rows import collect_rows


def test_recommendation_picks_within_tolerance():
    rows = collect_rows(fake_runs())["toy"]

    def line(lines, start):
        return next(x for x in lines if x.startswith(start))

    lines = recommend(rows)
    assert lines[0].startswith("- **Best student**: `kd`, accuracy 0.820 ± 0.028")
    # threshold 0.82 * 0.99 = 0.8118: int8 (0.81) is out, the combined variant (0.816) is in and smallest
    assert line(lines, "- **Smallest").startswith(
        "- **Smallest within 1% of it** (accuracy ≥ 0.812, by size): `kd + ps+int8`, 40.0 kB")
    assert line(lines, "- **Fastest").startswith(
        "- **Fastest within 1% of it** (accuracy ≥ 0.812, by paired speedup over the teacher at batch 8): `kd`, "
        "9.55 ± 0.64x")
    # size front: 40 kB at 0.816, 100 kB at 0.82 (kd beats the student alone; int8 loses to 40 kB), the teacher
    assert line(lines, "- Pareto front (accuracy vs size").endswith(": `kd + ps+int8`, `kd`, `teacher`.")
    # latency front: kd (4.2 ms, 0.82) beats every other student, then the teacher (40 ms, 0.90)
    assert line(lines, "- Pareto front (accuracy vs paired speedup").endswith(": `kd`, `teacher`.")
    assert lines[-1].startswith("- Caution:")  # std 0.028 > the 0.008 margin
    # with no tolerance only the best student itself qualifies
    assert "by size): `kd`, 100 kB" in line(recommend(rows, tolerance=0.0), "- **Smallest")


def test_fastest_pick_follows_the_paired_speedup_not_raw_latency():
    """Raw latency drifts between variants timed at different moments; the paired speedup does not. Where they
    disagree (as on the quickstart: logit-kd had the lower latency, int8 the higher speedup), the speedup decides."""
    runs = copy.deepcopy(fake_runs())
    for r in runs:
        for v in r["variants"]:
            if v["name"] == "distilled":  # the row `kd`: lowest raw latency (4.2 ms), now the lowest paired speedup
                v["speedup_vs_teacher"]["8"] = 1.5
    lines = recommend(collect_rows(runs)["toy"])
    fastest = next(x for x in lines if x.startswith("- **Fastest"))
    assert re.search(r"\): `([^`]+)`", fastest).group(1) == "kd + ps+int8"  # 8.0x at 5.0 ms


def test_recommendation_for_a_lower_is_better_metric():
    """Perplexity = 10 / accuracy of the same runs: the same picks, thresholds above the best, not below."""
    runs = copy.deepcopy(fake_runs())
    for r in runs:
        for v in r["variants"]:
            v.update(metric_name="perplexity", higher_is_better=False, metric=10 / v["metric"])
    rows = collect_rows(runs)["toy"]
    lines = recommend(rows)
    best = statistics.mean([10 / 0.80, 10 / 0.84])
    assert lines[0].startswith(f"- **Best student**: `kd`, perplexity {best:.3f}")
    smallest = next(x for x in lines if x.startswith("- **Smallest"))
    assert smallest.startswith(f"- **Smallest within 1% of it** (perplexity ≤ {best * 1.01:.3f}, by size): "
                               "`kd + ps+int8`, 40.0 kB")
    assert next(x for x in lines if x.startswith("- Pareto front (perplexity vs size")).endswith(
        ": `kd + ps+int8`, `kd`, `teacher`.")
    text = render(runs, "toy-suite")
    assert "(lower is better); **retention**: the teacher's perplexity / this row's perplexity." in text


def test_pareto_front_known_points():
    points = [(0.90, 10.0), (0.80, 5.0), (0.85, 12.0), (0.80, 5.0), (0.70, 1.0), (0.95, 10.0), (0.60, 2.0)]
    # (0.90, 10) and (0.85, 12) lose to (0.95, 10); (0.60, 2) to (0.70, 1); the duplicates dominate neither
    assert pareto_front(points) == [4, 1, 3, 5]


def test_pareto_front_with_two_costs_and_edge_cases():
    assert pareto_front([]) == []
    assert pareto_front([(0.5, 3.0)]) == [0]
    # quality, latency, size: the second point is slower but smaller, so both stay; the third loses to the first
    assert pareto_front([(0.9, 1.0, 9.0), (0.9, 2.0, 5.0), (0.8, 1.0, 9.0)]) == [0, 1]
