"""Numbers a person can read: three significant figures, mean ± std over seeds, "n/a" for anything not measured,
and the markdown table they go in."""

from __future__ import annotations

import math

from tabulate import tabulate

from kdbench.report.rows import Stat


def _decimals(x: float, digits: int = 3) -> int:
    if x == 0 or not math.isfinite(x):
        return 2
    return min(6, max(0, digits - 1 - math.floor(math.log10(abs(x)))))


def fmt_stat(s: Stat | None, *, decimals: int | None = None, scale: float = 1.0, suffix: str = "",
             signed: bool = False) -> str:
    """"2.25 ± 0.15", the std at the mean's precision; the mean alone for one seed; "n/a" when not measured."""
    if s is None:
        return "n/a"
    mean, std = s.mean * scale, s.std * scale
    d = _decimals(mean) if decimals is None else decimals
    shown = f"{mean:{'+' if signed else ''}.{d}f}"
    # an exactly constant figure (a file size) shows no "± 0"; the seeds column still says how many runs
    return f"{shown}{suffix}" if s.n == 1 or s.std == 0 else f"{shown} ± {std:.{d}f}{suffix}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.{_decimals(n / scale)}f} {unit}"
    return f"{n:.0f} B"


def fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.{_decimals(n / scale)}f}{unit}"
    return f"{n:.0f}"


def fmt_ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.{_decimals(num / den)}f}x" if num and den else "n/a"


def fmt_change(a: Stat | None, b: Stat | None) -> str:
    """Relative change A -> B; "†" marks a change no larger than the seed spread of the two sides."""
    if a is None or b is None or a.mean == 0:
        return "n/a"
    change = f"{(b.mean - a.mean) / abs(a.mean):+.1%}"
    spread = a.std + b.std if a.n > 1 and b.n > 1 else 0.0  # one seed tells nothing about the spread
    noisy = spread > 0 and abs(b.mean - a.mean) <= spread
    return change + " †" if noisy else change


def markdown_table(header: list[str], body: list[list[str]], text_columns: int) -> str:
    # The pipe format writes the alignment row, so GitHub right-aligns the numeric columns.
    align = ["left"] * text_columns + ["right"] * (len(header) - text_columns)
    return tabulate(body, headers=header, tablefmt="pipe", disable_numparse=True, colalign=align)
