"""Rows: variants grouped per line, aggregated over seeds, and the compression family of a variant."""

from __future__ import annotations

import math
import statistics

import pytest

from fake_results import fake_runs
from kdbench.report.rows import collect_rows, compression_family, metric_of


def test_rows_are_grouped_per_variant_and_ordered():
    rows = collect_rows(fake_runs())["toy"]
    assert [r.label for r in rows] == ["teacher", "student alone", "kd", "kd + int8", "kd + ps+int8"]
    assert [len(r.members) for r in rows] == [1, 2, 2, 2, 2]  # the failed seed adds no row
    assert [r.family for r in rows] == [None, None, "distillation", "quantization", "combined"]


def test_mean_and_sample_std_over_seeds():
    kd = collect_rows(fake_runs())["toy"][2]
    s = kd.stat(metric_of)
    assert s.n == 2 and s.mean == pytest.approx(0.82)
    assert s.std == pytest.approx(statistics.stdev([0.80, 0.84])) == pytest.approx(0.04 / math.sqrt(2))


@pytest.mark.parametrize("kind, steps, family", [
    ("compressed", ["prune_structured"], "pruning"),
    ("compressed", ["prune_unstructured"], "pruning"),
    ("compressed", ["fp16"], "quantization"),
    ("compressed", ["prune_unstructured", "bf16"], "combined"),
    ("compressed", ["mystery"], "other"),
    ("distilled", None, "distillation"),
    ("student", None, None),
    ("teacher", None, None),
])
def test_compression_family(kind, steps, family):
    v = {"kind": kind, "compression": {"steps": [{"name": s} for s in steps]} if steps else {}}
    assert compression_family(v) == family


def test_a_student_of_its_teachers_layers_is_labelled_by_what_was_built():
    """A `from_teacher` student names its teacher's model; the label comes from the built model's config instead
    (recorded as `architecture`), and a hub name stays a name."""
    runs = [r for r in fake_runs() if r["status"] == "ok"]
    for r in runs:
        r["spec"]["pair"]["student"] = {"model": r["spec"]["pair"]["teacher"]["model"], "from_teacher": {"every": 2}}
        for v in r["variants"]:
            v["architecture"] = "bert 2L/64H" if v["kind"] == "teacher" else "bert 1L/64H"
    rows = {row.label: row for row in collect_rows(runs)["toy"]}
    assert rows["teacher"].model == "bert 2L/64H" and rows["kd"].model == "bert 1L/64H"
    assert rows["student alone"].model == "bert 1L/64H"
    for r in runs:  # a plain hub student keeps its name, which says more than its shape
        r["spec"]["pair"]["student"] = {"model": "distilbert-base-uncased"}
    assert {row.label: row for row in collect_rows(runs)["toy"]}["kd"].model == "distilbert-base-uncased"
    for r in runs:  # results from before `architecture` existed keep their labels
        for v in r["variants"]:
            v.pop("architecture")
    assert {row.label: row for row in collect_rows(runs)["toy"]}["teacher"].model == "bert 2L/64H"
