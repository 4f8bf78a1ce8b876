"""Report rows of a pair with several teachers: a row each, named by its own model, and the best one (by metric,
either direction) is the row the others are measured against."""

import pytest

from fake_results import run, variant
from kdbench.report.rows import collect_rows, teacher_row

TEACHERS = [{"model": {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2}, "weight": 1.0},
            {"model": {"model_type": "bert", "hidden_size": 48, "num_hidden_layers": 3}, "weight": 2.0}]


def teacher_run(index: int, metric: float, higher_is_better: bool) -> dict:
    r = run("teacher", 0, [{**variant("teacher", "teacher", metric, size=400_000 - index, latency_b8=40.0),
                            "higher_is_better": higher_is_better}])
    r["run_id"] = f"toy__tiny__teacher{index + 1}"
    r["spec"]["teacher_index"] = index
    r["spec"]["pair"] = {**r["spec"]["pair"], "teacher": None, "teachers": TEACHERS}
    return r


@pytest.mark.parametrize("higher_is_better, metrics, best", [(True, (0.7, 0.9), "teacher 2"),
                                                              (False, (0.7, 0.9), "teacher 1"),
                                                              (True, (0.8, 0.8), "teacher 1")])
def test_each_teacher_has_its_row_and_the_best_is_the_reference(higher_is_better, metrics, best):
    rows = collect_rows([teacher_run(i, m, higher_is_better) for i, m in enumerate(metrics)])["toy"]
    assert [(r.label, r.model) for r in rows] == [("teacher 1", "bert 2L/64H"), ("teacher 2", "bert 3L/48H")]
    assert teacher_row(rows, "tiny").label == best
