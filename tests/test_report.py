"""Report tests on synthetic RunResults: no training, no torch models; known inputs, pinned outputs.

The fake suite (one task "toy", one pair "tiny", method "kd", seeds 0 and 1):
    teacher         metric 0.90, 400 kB, latency b8 40 ms
    student alone   0.60 / 0.70, 100 kB, b8 4.0 / 6.0 ms
    kd (distilled)  0.80 / 0.84, 100 kB, b8 4.0 / 4.4 ms, trained 10 / 14 s
    kd + int8       0.79 / 0.83,  50 kB, b8 8.0 / 8.0 ms                       (quantization)
    kd + ps+int8    0.812 / 0.820, 40 kB, b8 5.0 / 5.0 ms, 2 s recovery         (combined)
    kd seed 2       failed
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path

import pytest

from kdbench import report
from kdbench.report import Stat

TEACHER_METRIC = 0.9
LATENCY_METHOD = "time.perf_counter around model(**batch), batch {bs}, 3 warmup calls, {n} timed calls"
MEMORY_METHOD = "forkserver: peak RSS during one forward at batch 8"


def variant(name, kind, metric, *, size, latency_b8, steps=None, train_s=None, repeats=30, fmt="safetensors"):
    """A variant dict shaped like runner.profile_variant's."""
    latency = {bs: {"median_ms": ms, "repeats": repeats, "method": LATENCY_METHOD.format(bs=bs, n=repeats)}
               for bs, ms in (("1", latency_b8 / 4), ("8", latency_b8))}
    return {
        "name": name, "kind": kind, "metric_name": "accuracy", "metric": metric,
        "retention": metric / TEACHER_METRIC, "params": 1000, "nonzero_params": 900,
        "size": {"bytes": size, "format": fmt, "method": f"{fmt} file size"},
        "latency": latency,
        "speedup_vs_teacher": {"1": 10.0 / latency["1"]["median_ms"], "8": 40.0 / latency_b8},
        "memory": {"peak_mb": 20.0, "method": MEMORY_METHOD},
        "energy": {"joules_per_sample": None, "avg_power_w": None, "method": "n/a: no energy counter for cpu"},
        "compression": {"steps": [{"name": s, "params": {}} for s in steps]} if steps else {},
        "training": {"wall_s": train_s, "steps": int(train_s * 10)} if train_s is not None else None,
    }


def run(kind, seed, variants, *, method="kd", status="ok", error=None, train_s=None, torch="2.13.0"):
    name = {"teacher": "teacher", "student": "student"}.get(kind, method)
    run_id = f"toy__tiny__{name}" + ("" if kind == "teacher" else f"__s{seed}")
    return {
        "run_id": run_id,
        "spec": {
            "kind": kind, "seed": seed, "task": {"name": "toy"},
            "method": {"name": method} if kind == "distill" else None,
            "pair": {"name": "tiny",
                     "teacher": {"model": {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2}},
                     "student": {"model": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1}}},
            "profiling": {"batch_sizes": [1, 8]},
        },
        "status": status, "error": error, "error_kind": "bug" if error else None,
        "versions": {"kdbench": "0.1.0", "torch": torch}, "device": {"type": "cpu", "name": "Fake CPU",
                                                                      "threads": 2, "cpus": 2},
        "started": "2026-01-02T03:04:05+00:00",
        "training": {"wall_s": train_s} if train_s is not None else None,
        "variants": variants,
    }


def distill_run(seed, distilled, int8, combined, train_s):
    return run("distill", seed, [
        variant("distilled", "distilled", distilled, size=100_000, latency_b8=4.0 + 0.4 * seed, train_s=train_s),
        variant("int8", "compressed", int8, size=50_000, latency_b8=8.0, steps=["int8"], fmt="torch.save",
                repeats=5 + seed),
        variant("ps+int8", "compressed", combined, size=40_000, latency_b8=5.0,
                steps=["prune_structured", "int8"], train_s=2.0, fmt="torch.save"),
    ], train_s=train_s)


def fake_runs() -> list[dict]:
    return [
        run("teacher", 0, [variant("teacher", "teacher", TEACHER_METRIC, size=400_000, latency_b8=40.0,
                                   train_s=100.0)], train_s=100.0),
        run("student", 0, [variant("student", "student", 0.60, size=100_000, latency_b8=4.0, train_s=8.0)]),
        run("student", 1, [variant("student", "student", 0.70, size=100_000, latency_b8=6.0, train_s=8.0)]),
        distill_run(0, 0.80, 0.79, 0.812, train_s=10.0),
        distill_run(1, 0.84, 0.83, 0.820, train_s=14.0),
        run("distill", 2, [], status="failed", error="RuntimeError: boom"),
    ]


def write_suite(folder: Path, runs: list[dict]) -> Path:
    (folder / "runs").mkdir(parents=True)
    for r in runs:
        (folder / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))
    return folder


@pytest.fixture
def suite_dir(tmp_path) -> Path:
    return write_suite(tmp_path / "toy-suite", fake_runs())


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in `text` as a list of {header: cell} rows."""
    found, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            header, *body = block
            found.append([dict(zip(header, cells)) for cells in body[1:]])  # body[0] is the alignment row
            block = []
    return found


def row_of(table: list[dict], **match) -> dict:
    hits = [r for r in table if all(r.get(k) == v for k, v in match.items())]
    assert len(hits) == 1, (match, table)
    return hits[0]


# ---------------------------------------------------------------------------------------------------------------
# Rows and aggregation


def test_rows_are_grouped_per_variant_and_ordered():
    rows = report.collect_rows(fake_runs())["toy"]
    assert [r.label for r in rows] == ["teacher", "student alone", "kd", "kd + int8", "kd + ps+int8"]
    assert [len(r.members) for r in rows] == [1, 2, 2, 2, 2]  # the failed seed adds no row
    assert [r.family for r in rows] == [None, None, "distillation", "quantization", "combined"]


def test_mean_and_sample_std_over_seeds():
    kd = report.collect_rows(fake_runs())["toy"][2]
    s = kd.stat(report.metric_of)
    assert s.n == 2 and s.mean == pytest.approx(0.82)
    assert s.std == pytest.approx(statistics.stdev([0.80, 0.84])) == pytest.approx(0.04 / math.sqrt(2))


def test_task_table_cells():
    table = tables(report.render(fake_runs(), "toy"))[0]
    kd = row_of(table, variant="kd")
    assert kd["seeds"] == "2"
    assert kd["accuracy"] == "0.820 ± 0.028"
    assert kd["retention"] == "91.1 ± 3.1%"  # (0.80, 0.84) / 0.90
    assert kd["latency b8 ms"] == "4.20 ± 0.28"
    assert kd["latency b1 ms"] == "1.05 ± 0.07"
    assert kd["size"] == "100 kB" and kd["size ÷"] == "4.00x"
    assert kd["non-zero"] == "90.0%"
    assert kd["J/sample"] == "n/a"  # not measured: never shown as 0
    assert row_of(table, variant="teacher")["seeds"] == "1"
    assert row_of(table, variant="teacher")["model"] == "bert 2L/64H"
    assert row_of(table, variant="kd + int8")["train s"] == "n/a"
    assert row_of(table, variant="kd + int8")["train steps"] == "n/a"  # no recovery training
    assert row_of(table, variant="kd + ps+int8")["train steps"] == "20"  # its recovery steps, one per seed
    assert kd["train steps"] == "120 ± 28" and row_of(table, variant="student alone")["train steps"] == "80"


def test_failed_run_is_listed():
    text = report.render(fake_runs(), "toy")
    assert "## Failed runs" in text
    assert "`toy__tiny__kd__s2` (bug): RuntimeError: boom" in text
    assert "from 5 ok runs (1 failed)" in text
    only_failed = report.render(fake_runs()[-1:], "toy")  # no table, but still where it ran and why it failed
    assert "- device: cpu (Fake CPU)" in only_failed and "RuntimeError: boom" in only_failed


def test_write_report_keeps_the_runner_signature(suite_dir):
    text = report.write_report(suite_dir, suite_name="toy-suite-name")
    assert text.startswith("# kdbench results: toy-suite-name")
    assert (suite_dir / "README.md").read_text() == text
    assert "- device: cpu (Fake CPU), torch threads 2 of 2 CPUs" in text
    assert "- runs made: 2026-01-02 03:04 to 2026-01-02 03:04 UTC" in text


# ---------------------------------------------------------------------------------------------------------------
# Readable numbers and the "how measured" legend


@pytest.mark.parametrize("stat, kwargs, shown", [
    (Stat(396.537, 0.0, 1), {}, "397"),
    (Stat(2.24712, 0.1532, 3), {}, "2.25 ± 0.15"),
    (Stat(0.042131, 0.0, 1), {}, "0.0421"),
    (Stat(0.8313, 0.0861, 3), {"decimals": 1, "scale": 100, "suffix": "%"}, "83.1 ± 8.6%"),
    (Stat(0.17, 0.0424, 2), {"decimals": 3, "signed": True}, "+0.170 ± 0.042"),
    (Stat(1.29, 0.0, 3), {"suffix": "x"}, "1.29x"),  # exactly constant over seeds: no "± 0"
    (None, {}, "n/a"),
])
def test_fmt_stat(stat, kwargs, shown):
    assert report.fmt_stat(stat, **kwargs) == shown


def test_fmt_bytes_and_counts():
    assert [report.fmt_bytes(b) for b in (355_848, 74_496, 1_234_567_890, 512, None)] == [
        "356 kB", "74.5 kB", "1.23 GB", "512 B", "n/a"]
    assert [report.fmt_count(n) for n in (87_874, 22_700_000, 999)] == ["87.9k", "22.7M", "999"]


def test_merge_numbers():
    strings = [LATENCY_METHOD.format(bs=1, n=30), LATENCY_METHOD.format(bs=8, n=5),
               LATENCY_METHOD.format(bs=8, n=9), LATENCY_METHOD.format(bs=8, n=12), LATENCY_METHOD.format(bs=1, n=7)]
    assert report.merge_numbers(strings) == LATENCY_METHOD.format(bs="1/8", n="5–30")


def test_how_measured_legend_is_deduplicated():
    text = report.render(fake_runs(), "toy")
    latency = [line for line in text.splitlines() if line.startswith("- **latency method**")]
    assert latency == ["- **latency method**: " + LATENCY_METHOD.format(bs="1/8", n="5/6/30")]
    assert text.count(MEMORY_METHOD) == 1
    sizes = [line for line in text.splitlines() if line.startswith("- **size format**")]
    assert sizes == ["- **size format**: safetensors, safetensors file size (rows: teacher, student alone, kd)",
                     "- **size format**: torch.save, torch.save file size (rows: kd + int8, kd + ps+int8)"]
    assert "- **energy method**: n/a: no energy counter for cpu" in text


# ---------------------------------------------------------------------------------------------------------------
# Compression families and the recommendation


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
    assert report.compression_family(v) == family


def test_families_table_values():
    rows = report.collect_rows(fake_runs())["toy"]
    table = tables(report.families_table(rows, "tiny"))[0]
    assert row_of(table, family="pruning")["variant"] == "not measured"
    kd = row_of(table, family="distillation")
    assert (kd["variant"], kd["size ÷ teacher"], kd["retention"]) == ("kd", "4.00x", "91.1 ± 3.1%")
    assert kd["Δ metric vs base"] == "+0.170 ± 0.042"  # vs student alone, per seed: 0.20, 0.14
    assert kd["speedup b8"] == "9.55 ± 0.64x"  # 40/4.0, 40/4.4
    int8 = row_of(table, family="quantization")
    assert (int8["size ÷ teacher"], int8["size ÷ base"]) == ("8.00x", "2.00x")
    assert int8["Δ metric vs base"] == "-0.010"  # 0.79 - 0.80 and 0.83 - 0.84: constant
    combined = row_of(table, family="combined")
    assert combined["size ÷ teacher"] == "10.0x"
    assert combined["Δ metric vs base"] == "-0.004 ± 0.023"  # 0.012, -0.020
    assert combined["training s"] == "14.0 ± 2.8"  # distillation (10, 14) + 2 s recovery


def test_recommendation_picks_within_tolerance():
    rows = report.collect_rows(fake_runs())["toy"]

    def line(lines, start):
        return next(x for x in lines if x.startswith(start))

    lines = report.recommend(rows)
    assert lines[0].startswith("- **Best student**: `kd`, accuracy 0.820 ± 0.028")
    # threshold 0.82 * 0.99 = 0.8118: int8 (0.81) is out, the combined variant (0.816) is in and smallest
    assert line(lines, "- **Smallest").startswith(
        "- **Smallest within 1% of it** (accuracy ≥ 0.812, by size): `kd + ps+int8`, 40.0 kB")
    assert line(lines, "- **Fastest").startswith(
        "- **Fastest within 1% of it** (accuracy ≥ 0.812, by latency at batch 8): `kd`, 4.20 ± 0.28 ms")
    # size front: 40 kB at 0.816, 100 kB at 0.82 (kd beats the student alone; int8 loses to 40 kB), the teacher
    assert line(lines, "- Pareto front (accuracy vs size").endswith(": `kd + ps+int8`, `kd`, `teacher`.")
    # latency front: kd (4.2 ms, 0.82) beats every other student, then the teacher (40 ms, 0.90)
    assert line(lines, "- Pareto front (accuracy vs latency").endswith(": `kd`, `teacher`.")
    assert lines[-1].startswith("- Caution:")  # std 0.028 > the 0.008 margin
    # with no tolerance only the best student itself qualifies
    assert "by size): `kd`, 100 kB" in line(report.recommend(rows, tolerance=0.0), "- **Smallest")


def test_recommendation_for_a_lower_is_better_metric():
    """Perplexity = 10 / accuracy of the same runs: the same picks, thresholds above the best, not below."""
    runs = copy.deepcopy(fake_runs())
    for r in runs:
        for v in r["variants"]:
            v.update(metric_name="perplexity", higher_is_better=False, metric=10 / v["metric"])
    rows = report.collect_rows(runs)["toy"]
    lines = report.recommend(rows)
    best = statistics.mean([10 / 0.80, 10 / 0.84])
    assert lines[0].startswith(f"- **Best student**: `kd`, perplexity {best:.3f}")
    smallest = next(x for x in lines if x.startswith("- **Smallest"))
    assert smallest.startswith(f"- **Smallest within 1% of it** (perplexity ≤ {best * 1.01:.3f}, by size): "
                               "`kd + ps+int8`, 40.0 kB")
    assert next(x for x in lines if x.startswith("- Pareto front (perplexity vs size")).endswith(
        ": `kd + ps+int8`, `kd`, `teacher`.")
    text = report.render(runs, "toy-suite")
    assert "(lower is better); **retention**: the teacher's perplexity / this row's perplexity." in text


# ---------------------------------------------------------------------------------------------------------------
# Pareto front


def test_pareto_front_known_points():
    points = [(0.90, 10.0), (0.80, 5.0), (0.85, 12.0), (0.80, 5.0), (0.70, 1.0), (0.95, 10.0), (0.60, 2.0)]
    # (0.90, 10) and (0.85, 12) lose to (0.95, 10); (0.60, 2) to (0.70, 1); the duplicates dominate neither
    assert report.pareto_front(points) == [4, 1, 3, 5]


def test_pareto_front_with_two_costs_and_edge_cases():
    assert report.pareto_front([]) == []
    assert report.pareto_front([(0.5, 3.0)]) == [0]
    # quality, latency, size: the second point is slower but smaller, so both stay; the third loses to the first
    assert report.pareto_front([(0.9, 1.0, 9.0), (0.9, 2.0, 5.0), (0.8, 1.0, 9.0)]) == [0, 1]


# ---------------------------------------------------------------------------------------------------------------
# Plots


def test_plots_are_written_and_linked(suite_dir):
    text = report.write_report(suite_dir)
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
    text = report.write_report(write_suite(tmp_path / "s", runs))
    assert "](toy_exact-match_vs_latency.png)" in text and (tmp_path / "s" / "toy_exact-match_vs_size.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# compare()


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
    text = report.compare(write_suite(tmp_path / "a", a_runs), write_suite(tmp_path / "b", b_runs))
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
    table = tables(report.compare(write_suite(tmp_path / "a", a_runs), write_suite(tmp_path / "b", b_runs)))[0]
    kd = row_of(table, variant="kd")
    assert (kd["perplexity A"], kd["perplexity B"], kd["perplexity Δ"]) == ("2.000", "2.500", "+25.0%")
    assert (kd["decode b1 ms/token A"], kd["decode b1 ms/token B"], kd["decode b1 ms/token Δ"]) == (
        "3.00", "1.50", "-50.0%")
    assert not any(k.startswith(("rouge_l", "decode b4")) for k in kd)  # on one side only


def test_fmt_change_marks_noise():
    assert report.fmt_change(Stat(10.0, 1.0, 3), Stat(11.0, 0.5, 3)) == "+10.0% †"
    assert report.fmt_change(Stat(10.0, 0.1, 3), Stat(11.0, 0.1, 3)) == "+10.0%"
    assert report.fmt_change(Stat(10.0, 0.0, 1), Stat(11.0, 0.0, 1)) == "+10.0%"  # one seed: no spread known
    assert report.fmt_change(None, Stat(1.0, 0.0, 1)) == "n/a"
