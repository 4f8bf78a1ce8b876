"""Reports: markdown tables and plots rendered from the RunResult JSONs, so `kdbench report DIR` can redo them.

`write_report(dir)` writes `dir/README.md` and, next to it, two PNG plots per task; `compare(dir_a, dir_b)`
tabulates the changes between two results folders. The metric is higher-is-better (accuracy) unless its variants
say otherwise (`higher_is_better: false`, as for perplexity); latency, size and memory are lower-is-better.

    rows         RunResults -> rows (one per variant, over seeds); Stat; the readers of a variant's figures
    formatting   numbers as people read them; the markdown table
    tables       the variant table, the console summary, the compression-families table
    legend       how each figure was measured; the columns' definitions
    picks        what to ship: the Pareto front and the recommendation
    plots        quality vs latency and vs size
    readme       the README (render, write_report)
    compare      two results folders side by side
"""

from __future__ import annotations

from kdbench.report.compare import compare
from kdbench.report.readme import render, write_report
from kdbench.report.rows import Stat, collect_rows
from kdbench.report.tables import console_summary, task_tables

__all__ = ["Stat", "collect_rows", "compare", "console_summary", "render", "task_tables", "write_report"]
