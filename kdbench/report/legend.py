"""How each figure of a table was measured: the profiler's own `method` strings, deduplicated, and the
definitions of the table's columns."""

from __future__ import annotations

import re
from collections import defaultdict

from kdbench.report.rows import Row, display_names

_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def merge_numbers(strings: list[str]) -> str:
    """Merge strings that differ only in their numbers, slot by slot: a few values as "1/32", many as "5–30".

    ["batch 1, 30 calls", "batch 32, 5 calls"] -> "batch 1/32, 5/30 calls". All strings must share the template
    `_NUMBER.sub("#", s)`.
    """
    parts = _NUMBER.sub("#", strings[0]).split("#")
    slots = zip(*(_NUMBER.findall(s) for s in strings))
    merged = parts[0]
    for part, values in zip(parts[1:], slots):
        distinct = sorted(set(values), key=float)
        merged += distinct[0] if len(distinct) == 1 else (
            "/".join(distinct) if len(distinct) <= 3 else f"{distinct[0]}–{distinct[-1]}")
        merged += part
    return merged


def _method_strings(v: dict) -> list[tuple[str, str]]:
    """(figure, how it was measured) pairs recorded in one variant."""
    found = [("latency method", lat["method"]) for lat in (v.get("latency") or {}).values() if lat.get("method")]
    found += [("decoding method", g["method"]) for g in (v.get("generation") or {}).values() if g.get("method")]
    if (v.get("memory") or {}).get("method"):
        found.append(("peak memory method", v["memory"]["method"]))
    if (v.get("size") or {}).get("method"):
        found.append(("size format", f"{v['size'].get('format', '?')}, {v['size']['method']}"))
    if (v.get("energy") or {}).get("method"):
        found.append(("energy method", v["energy"]["method"]))
    return found


def how_measured(rows: list[Row]) -> list[str]:
    """Legend lines: each distinct measurement method once, with the rows it covers when it is not all of them."""
    names = display_names(rows)
    # figure -> template -> (the strings, the rows that used them), in first-seen order
    groups: dict[str, dict[str, tuple[list[str], list[str]]]] = defaultdict(dict)
    for row, name in zip(rows, names):
        for v in row.variants:
            for figure, method in _method_strings(v):
                strings, covered = groups[figure].setdefault(_NUMBER.sub("#", method), ([], []))
                strings.append(method)
                if name not in covered:
                    covered.append(name)
    lines = []
    for figure, templates in groups.items():
        for strings, covered in templates.values():
            scope = "" if len(covered) == len(rows) else f" (rows: {', '.join(covered)})"
            lines.append(f"- **{figure}**: {merge_numbers(strings)}{scope}")
    return lines


DEFINITIONS = [
    "- **{metric}**: on the task's eval split ({better} is better); **retention**: {retention}.",
    "- **size ÷**: the teacher's size / this row's size; sizes in decimal units (1 kB = 1000 B); "
    "**non-zero**: non-zero parameters / parameters.",
    "- **latency**: median over the timed calls (absolute times drift with the machine's load); **speedup**: "
    "the teacher and this row timed in alternation, median over rounds of teacher time / row time, so drift "
    "cancels (the teacher's own row is 1x by definition).",
    "- **train s**: wall time of the training that made the row: fine-tuning for the teacher, training for "
    "students, recovery steps for compressed variants (n/a: none); **train steps**: its optimizer steps (rows that "
    "differ in steps are not an equal-compute comparison; a method may set its own `training`).",
    "- Every figure is mean ± sample std over seeds; n/a: not measured.",
]
