"""The "how measured" legend: method strings merged by their numbers, each method once."""

from __future__ import annotations

from fake_results import LATENCY_METHOD, MEMORY_METHOD, fake_runs
from kdbench.report.legend import merge_numbers
from kdbench.report.readme import render


def test_merge_numbers():
    strings = [LATENCY_METHOD.format(bs=1, n=30), LATENCY_METHOD.format(bs=8, n=5),
               LATENCY_METHOD.format(bs=8, n=9), LATENCY_METHOD.format(bs=8, n=12), LATENCY_METHOD.format(bs=1, n=7)]
    assert merge_numbers(strings) == LATENCY_METHOD.format(bs="1/8", n="5–30")


def test_how_measured_legend_is_deduplicated():
    text = render(fake_runs(), "toy")
    latency = [line for line in text.splitlines() if line.startswith("- **latency method**")]
    assert latency == ["- **latency method**: " + LATENCY_METHOD.format(bs="1/8", n="5/6/30")]
    assert text.count(MEMORY_METHOD) == 1
    sizes = [line for line in text.splitlines() if line.startswith("- **size format**")]
    assert sizes == ["- **size format**: safetensors, safetensors file size (rows: teacher, student alone, kd)",
                     "- **size format**: torch.save, torch.save file size (rows: kd + int8, kd + ps+int8)"]
    assert "- **energy method**: n/a: no energy counter for cpu" in text
