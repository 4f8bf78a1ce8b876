"""What to ship: the Pareto front, and the best student with the smallest and fastest close to it."""

from __future__ import annotations

from kdbench.report.formatting import fmt_bytes, fmt_stat
from kdbench.report.rows import (
    Row, batch_sizes, display_names, metric_name, metric_of, metric_sign, retention_of, size_of, speedup_of,
)

# Recommendations accept any student whose mean metric is at least (1 - TOLERANCE) x the best student's.
TOLERANCE = 0.01


def pareto_front(points: list[tuple[float, ...]]) -> list[int]:
    """Indices of the points that no other point dominates, cheapest first.

    A point is (quality, cost, ...costs): quality is maximised, every cost minimised. Point q dominates p when
    it is at least as good in every coordinate and better in one; identical points do not dominate each other.
    """

    def dominates(q, p):
        no_worse = q[0] >= p[0] and all(qc <= pc for qc, pc in zip(q[1:], p[1:]))
        return no_worse and tuple(q) != tuple(p)

    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (points[i][1:], -points[i][0], i))


def recommend(rows: list[Row], tolerance: float = TOLERANCE) -> list[str]:
    """The best student, the smallest and fastest within `tolerance` of it, and the Pareto fronts (markdown)."""
    names = dict(zip(map(id, rows), display_names(rows)))
    metric = metric_name(rows)
    students = [r for r in rows if r.kind != "teacher" and r.stat(metric_of)]
    if not students:
        return ["No student finished, so there is nothing to recommend."]
    bss = batch_sizes(rows)
    sign = metric_sign(rows)  # compare sign * metric, so "more is better" holds for perplexity too
    best = max(students, key=lambda r: sign * r.mean(metric_of))
    best_metric = best.stat(metric_of)
    threshold = best_metric.mean * (1 - sign * tolerance)
    close = [r for r in students if sign * r.mean(metric_of) >= sign * threshold]
    bound = "≥" if sign > 0 else "≤"
    lines = [f"- **Best student**: `{names[id(best)]}`, {metric} {fmt_stat(best_metric, decimals=3)} "
             f"({fmt_stat(best.stat(retention_of), decimals=1, scale=100, suffix='%')} of the teacher)."]
    # (word, figure, reader, how to show it, direction): the speed pick uses the paired speedup over the teacher,
    # timed in alternation with it, because raw latency drifts with the machine's load between variants
    costs = [("Smallest", "size", size_of, lambda s: fmt_bytes(s.mean), 1)]
    if bss:
        costs.insert(0, ("Fastest", f"paired speedup over the teacher at batch {bss[-1]}", speedup_of(bss[-1]),
                         lambda s: fmt_stat(s, suffix="x"), -1))
    for word, figure, read, show, direction in costs:
        measured = [r for r in close if r.stat(read)]
        if measured:
            # ties (e.g. the same file size) go to the better metric
            pick = min(measured, key=lambda r: (direction * r.mean(read), -sign * r.mean(metric_of)))
            lines.append(f"- **{word} within {tolerance:.0%} of it** ({metric} {bound} {threshold:.3f}, by {figure}): "
                         f"`{names[id(pick)]}`, {show(pick.stat(read))}, {metric} "
                         f"{fmt_stat(pick.stat(metric_of), decimals=3)}.")
    for _, figure, read, _, direction in costs:
        measured = [r for r in rows if r.stat(metric_of) and r.stat(read)]
        front = pareto_front([(sign * r.mean(metric_of), direction * r.mean(read)) for r in measured])
        lines.append(f"- Pareto front ({metric} vs {figure}, best first): "
                     + ", ".join(f"`{names[id(measured[i])]}`" for i in front) + ".")
    margin = abs(best_metric.mean - threshold)
    if best_metric.n > 1 and best_metric.std > margin:
        lines.append(f"- Caution: the best student's seed spread (± {best_metric.std:.3f}) is wider than the "
                     f"{tolerance:.0%} margin ({margin:.3f}), so these picks are within noise at {best_metric.n} "
                     "seeds.")
    return lines
