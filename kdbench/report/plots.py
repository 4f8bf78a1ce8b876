"""Plots: quality against latency and against size, one point per row, the Pareto front marked."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

from kdbench.report.formatting import fmt_bytes
from kdbench.report.picks import pareto_front
from kdbench.report.rows import (
    Row, batch_sizes, display_names, latency_of, metric_name, metric_of, metric_sign, size_of,
)

log = logging.getLogger(__name__)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "task"


def _colour_key(row: Row) -> str:
    return row.family or {"teacher": "teacher", "student": "student alone"}.get(row.kind, row.kind)


COLOURS = {"teacher": "black", "student alone": "grey", "distillation": "tab:blue", "pruning": "tab:green",
           "quantization": "tab:orange", "combined": "tab:purple", "other": "tab:brown"}


def x_scale(xs: list[float]) -> str:
    """Log when the costs spread over more than 10x (a teacher far right would squeeze the students left)."""
    return "log" if min(xs) > 0 and max(xs) / min(xs) > 10 else "linear"


def plot_tradeoff(rows: list[Row], read_x: Callable, xlabel: str, title: str, path: Path,
                  x_format: Callable[[float], str] | None = None) -> bool:
    """One PNG: mean metric (y) against mean cost (x) with std error bars; False when nothing was measured."""
    fig = tradeoff_figure(rows, read_x, xlabel, title, x_format)
    if fig is None:
        return False
    fig.savefig(path, format="png")
    return True


def tradeoff_figure(rows: list[Row], read_x: Callable, xlabel: str, title: str,
                    x_format: Callable[[float], str] | None = None):
    """The figure of plot_tradeoff, or None when nothing was measured."""
    # The object API with an Agg canvas: no pyplot, so no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    names = display_names(rows)
    points = [(row, name, row.stat(metric_of), row.stat(read_x)) for row, name in zip(rows, names)]
    points = [p for p in points if p[2] and p[3]]
    if not points:
        return None
    fig = Figure(figsize=(11, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.07, 0.11, 0.58, 0.8))
    # Variants often share a size or a latency, so points carry numbers and the names go in a key beside the
    # axes; neighbouring numbers get staggered heights so they stay legible.
    for k, (number, (row, name, y, x)) in enumerate(
            sorted(enumerate(points, 1), key=lambda p: (p[1][3].mean, p[1][2].mean))):
        key = _colour_key(row)
        teacher = row.kind == "teacher"
        ax.errorbar(x.mean, y.mean, xerr=x.std, yerr=y.std, fmt="*" if teacher else "o", markersize=12 if teacher
                    else 6, capsize=3, color=COLOURS.get(key, "tab:red"), label=key)
        if teacher:  # the reference every retention is against, named on the plot itself
            ax.annotate("teacher", (x.mean, y.mean), xytext=(-8, -14), textcoords="offset points", fontsize=8,
                        ha="right", fontweight="bold")
        ax.annotate(str(number), (x.mean, y.mean), xytext=(5, (3, -10, 12)[k % 3]), textcoords="offset points",
                    fontsize=8)
    front = pareto_front([(metric_sign(rows) * y.mean, x.mean) for _, _, y, x in points])
    fx, fy = [points[i][3].mean for i in front], [points[i][2].mean for i in front]
    # steps-post traces the attainable region: each front point's quality holds until a costlier one beats it
    ax.plot(fx, fy, "--", color="tab:red", drawstyle="steps-post", linewidth=1)
    ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="tab:red", label="Pareto front")
    ax.set_xscale(x_scale([x.mean for *_, x in points]))
    if x_format:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: x_format(value)))
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per colour, in the same order on every plot
    order = sorted(unique, key=lambda k: list(COLOURS).index(k) if k in COLOURS else len(COLOURS))
    ax.legend([unique[k] for k in order], order, fontsize=7, loc="best")
    metric = metric_name(rows)
    better = "higher" if metric_sign(rows) > 0 else "lower"
    ax.set(xlabel=xlabel, ylabel=f"{metric}, {better} is better (mean ± std over seeds)", title=title)
    ax.grid(True, alpha=0.3)
    on_front = set(front)
    key_text = "\n".join(f"{n:>2}  {name}{'  (front)' if n - 1 in on_front else ''}"
                         for n, (_, name, _, _) in enumerate(points, 1))
    fig.text(0.67, 0.91, key_text, fontsize=8, va="top", family="monospace")
    return fig


def write_plots(rows: list[Row], out_dir: Path) -> list[tuple[str, str]]:
    """Write a task's plots into out_dir; return (title, file name) for each plot written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no plots")
        return []
    metric = metric_name(rows)
    bss = batch_sizes(rows)
    plots = [("size", size_of, "size on disk", fmt_bytes)]
    if bss:
        plots.insert(0, ("latency", latency_of(bss[-1]), f"latency at batch {bss[-1]} (ms, median of timed calls)",
                         None))
    written = []
    for figure, read, xlabel, x_format in plots:
        name = f"{_slug(rows[0].task)}_{_slug(metric)}_vs_{figure}.png"
        title = f"{rows[0].task}: {metric} vs {figure} (Pareto front circled)"
        if plot_tradeoff(rows, read, xlabel, title, Path(out_dir) / name, x_format):
            written.append((f"{metric} vs {figure}", name))
    return written
