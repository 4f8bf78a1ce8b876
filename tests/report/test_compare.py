"""Comparing two results folders: the figures of both sides and the relative change."""

from __future__ import annotations

import copy

from fake_results import (
    TEACHER_METRIC,
    fake_runs,
    row_of,
    run,
    tables,
    variant,
    write_suite,
)
from kdbench.report.compare import compare


def test_compare_two_folders(tmp_path):
    a_runs = fake_runs()
    b_runs = copy.deepcopy(a_runs)
    for r in b_runs:
        r["versions"]["torch"] = "2.14.0"
        if r["spec"]["kind"] == "distill" and r["status"] == "ok":
            r["variants"][0]["latency"]["8"]["median_ms"] *= 2  # kd twice as slow in B
            r["variants"][0]["speedup_vs_teacher"]["8"] /= 2
            r["variants"][0]["metric"] += 0.10
            r["variants"][0]["retention"] = r["variants"][0]["metric"] / TEACHER_METRIC
            r["variants"] = [v for v in r["variants"] if v["name"] != "int8"]  # int8 only in A
    b_runs.append(run("distill", 0, [variant("distilled", "distilled", 0.5, size=1, latency_b8=1.0)],
                      method="fitnet", torch="2.14.0"))  # only in B
    text = compare(write_suite(tmp_path / "a", a_runs), write_suite(tmp_path / "b", b_runs))
    table = tables(text)[0]
    kd = row_of(table, variant="kd")
    assert (kd["metric A"], kd["metric B"], kd["metric Δ"]) == ("0.820 ± 0.028", "0.920 ± 0.028", "+12.2%")
    assert (kd["retention A"], kd["retention B"]) == ("91.1 ± 3.1%", "102.2 ± 3.1%")
    latency = (kd["latency b8 ms A"], kd["latency b8 ms B"], kd["latency b8 ms Δ"])
    assert latency == ("4.20 ± 0.28", "8.40 ± 0.57", "+100.0%")
    assert kd["speedup b8 Δ"] == "-50.0%"
    assert row_of(table, variant="student alone")["speedup b8 Δ"] == "+0.0% †"
    assert (kd["size A"], kd["size B"], kd["size Δ"]) == ("100 kB", "100 kB", "+0.0%")
    student = row_of(table, variant="student alone")
    assert student["metric Δ"] == "+0.0% †"  # no change: within the seed spread
    assert "- only in A: `tiny: kd + int8`" in text
    assert "- only in B: `tiny: fitnet`" in text
    assert "; cpu (Fake CPU); torch 2.13.0, kdbench" in text.splitlines()[2]  # A's setup
    assert "; cpu (Fake CPU); torch 2.14.0, kdbench" in text.splitlines()[3]  # B's
    assert {r["variant"] for r in table} == {"teacher", "student alone", "kd", "kd + ps+int8"}
    assert not any(k.startswith(("decode", "perplexity")) for k in kd)  # nothing recorded, no column


def test_compare_shows_the_extra_metrics_and_decoding_both_sides_have(tmp_path):
    a_runs = fake_runs()
    for r in a_runs:
        for v in r["variants"]:
            v["extra_metrics"] = {"perplexity": 2.0, "rouge_l": 0.3}
            v["generation"] = {"1": {"ms_per_token": 3.0}, "4": {"ms_per_token": 1.0}}
    b_runs = copy.deepcopy(a_runs)
    for r in b_runs:
        for v in r["variants"]:
            v["extra_metrics"] = {"perplexity": 2.5}  # no ROUGE-L in B
            v["generation"] = {"1": {"ms_per_token": 1.5}}  # only batch 1 timed in B
    table = tables(compare(write_suite(tmp_path / "a", a_runs), write_suite(tmp_path / "b", b_runs)))[0]
    kd = row_of(table, variant="kd")
    assert (kd["perplexity A"], kd["perplexity B"], kd["perplexity Δ"]) == ("2.000", "2.500", "+25.0%")
    assert (kd["decode b1 ms/token A"], kd["decode b1 ms/token B"], kd["decode b1 ms/token Δ"]) == (
        "3.00", "1.50", "-50.0%")
    assert not any(k.startswith(("rouge_l", "decode b4")) for k in kd)  # on one side only
