"""The variant table, the compression-families table and the console summary, cell by cell."""

from __future__ import annotations

from fake_results import fake_runs, row_of, tables
from kdbench.report.readme import render
from kdbench.report.rows import collect_rows
from kdbench.report.tables import console_summary, families_table


def test_task_table_cells():
    table = tables(render(fake_runs(), "toy"))[0]
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


def test_families_table_values():
    rows = collect_rows(fake_runs())["toy"]
    table = tables(families_table(rows, "tiny"))[0]
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


def test_console_summary_fits_100_columns_and_has_the_picks():
    text = console_summary(fake_runs())
    assert max(map(len, text.splitlines())) <= 100
    assert "What should I ship?" in text and "- Best student: kd, accuracy 0.820 ± 0.028" in text
    header = next(x for x in text.splitlines() if x.startswith("variant"))
    assert header.split() == ["variant", "accuracy", "retention", "size", "÷", "speedup", "b8"]
