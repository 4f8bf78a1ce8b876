"""Numbers as the tables show them: mean ± std, bytes, counts, and changes marked when within noise."""

from __future__ import annotations

import pytest

from kdbench.report.formatting import fmt_bytes, fmt_change, fmt_count, fmt_stat
from kdbench.report.rows import Stat


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
    assert fmt_stat(stat, **kwargs) == shown


def test_fmt_bytes_and_counts():
    assert [fmt_bytes(b) for b in (355_848, 74_496, 1_234_567_890, 512, None)] == [
        "356 kB", "74.5 kB", "1.23 GB", "512 B", "n/a"]
    assert [fmt_count(n) for n in (87_874, 22_700_000, 999)] == ["87.9k", "22.7M", "999"]


def test_fmt_change_marks_noise():
    assert fmt_change(Stat(10.0, 1.0, 3), Stat(11.0, 0.5, 3)) == "+10.0% †"
    assert fmt_change(Stat(10.0, 0.1, 3), Stat(11.0, 0.1, 3)) == "+10.0%"
    assert fmt_change(Stat(10.0, 0.0, 1), Stat(11.0, 0.0, 1)) == "+10.0%"  # one seed: no spread known
    assert fmt_change(None, Stat(1.0, 0.0, 1)) == "n/a"
