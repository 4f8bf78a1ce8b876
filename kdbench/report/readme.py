"""The README of a results folder: where the runs were made, then per task its table, how it was measured, what
to ship, its plots and what each compression bought; then the failures. `write_report` writes it."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from kdbench.report.formatting import fmt_count
from kdbench.report.legend import DEFINITIONS, how_measured
from kdbench.report.picks import recommend
from kdbench.report.plots import write_plots
from kdbench.report.rows import (
    Row, collect_rows, display_names, distinct, extra_metric_names, generation_batch_sizes, metric_name, metric_sign,
    teacher_row,
)
from kdbench.report.tables import FAMILIES_NOTE, families_table, task_table
from kdbench.results import read_results


def header_lines(results: list[dict]) -> list[str]:
    """Where and with what the runs were made; several values mean a suite resumed on another setup."""
    ok = [r for r in results if r.get("status") == "ok"] or results  # a failed run still says where it ran
    devices = distinct(f"{r['device']['type']} ({r['device']['name']}), torch threads {r['device']['threads']}"
                        + (f" of {r['device']['cpus']} CPUs" if r["device"].get("cpus") else "") for r in ok)
    keys = distinct(k for r in ok for k in r.get("versions", {}))
    versions = [f"{k} {'/'.join(map(str, vals))}" for k in keys
                if (vals := distinct(r["versions"].get(k) for r in ok if r["versions"].get(k)))]
    started = sorted(datetime.fromisoformat(r["started"]).astimezone(timezone.utc) for r in ok if r.get("started"))
    lines = [f"- device: {' | '.join(devices)}" + ("  (runs from more than one setup: compare with care)"
                                                  if len(devices) > 1 else ""),
             f"- versions: {', '.join(versions)}"]
    if started:
        lines.append(f"- runs made: {started[0]:%Y-%m-%d %H:%M} to {started[-1]:%Y-%m-%d %H:%M} UTC")
    n_ok = sum(r.get("status") == "ok" for r in results)
    # No render time: the same runs render to the same bytes, so re-running a finished suite changes no file.
    lines.append(f"- from {n_ok} ok runs ({len(results) - n_ok} failed); re-render with `kdbench report <this folder>`")
    return lines


def teachers_notes(rows: list[Row]) -> list[str]:
    """A line per pair with several teachers: which one the other rows are measured against."""
    lines = []
    for pair in distinct(r.pair for r in rows):
        teachers = [r for r in rows if r.pair == pair and r.kind == "teacher"]
        best = teacher_row(rows, pair)
        if len(teachers) > 1 and best is not None:
            lines.append(f"- **{len(teachers)} teachers** ({pair}): the students distil from their ensemble; "
                         f"retention, speedup and size ÷ are against the best, `{best.label}` (each teacher's own "
                         "row: against itself).")
    return lines


def multitask_notes(rows: list[Row]) -> list[str]:
    """One line per multi-task row: which tasks share its student, and the parameters of the whole group."""
    lines = []
    for row, name in zip(rows, display_names(rows)):
        info = next((v["multitask"] for v in row.variants if v.get("multitask")), None)
        if info and row.kind == "distilled":
            lines.append(f"- **{name}**: one student for the tasks {', '.join(info['tasks'])} (a shared encoder, a "
                         f"head per task); this task's model has {fmt_count(info['task_params'])} parameters, the "
                         f"whole group {fmt_count(info['group_params'])}.")
    return lines


def render(results: list[dict], suite_name: str, plots: dict[str, list[tuple[str, str]]] | None = None) -> str:
    """The README text; `plots` maps a task to the (title, file name) of its plots, written beforehand."""
    failed = [r for r in results if r.get("status") != "ok"]
    lines = [f"# kdbench results: {suite_name}", ""]
    lines += header_lines(results) + [""] if results else ["No runs found.", ""]
    for task, rows in collect_rows(results).items():
        metric = metric_name(rows)
        lines += [f"## {task}", "", task_table(rows), "", "How measured:", ""]
        ratio = (f"{metric} / the teacher's {metric}" if metric_sign(rows) > 0
                 else f"the teacher's {metric} / this row's {metric}")
        better = "higher" if metric_sign(rows) > 0 else "lower"
        lines += [d.format(metric=metric, better=better, retention=ratio) for d in DEFINITIONS]
        lines += [f"- **{name}**: also measured on the eval split, next to the task metric (not used for retention "
                  "or the picks below)." for name in extra_metric_names(rows)]
        if generation_batch_sizes(rows):
            lines.append("- **decode ms/token**: median time of one greedy generate() call of a fixed number of new "
                         "tokens after the profiling batch, divided by that number (the whole batch decodes together; "
                         "prompt processing included).")
        lines += how_measured(rows) + multitask_notes(rows) + teachers_notes(rows) + [""]
        lines += ["### What should I ship?", ""] + recommend(rows) + [""]
        lines += [f"![{title}]({name})" for title, name in (plots or {}).get(task, [])] + [""]
        for pair in distinct(r.pair for r in rows):
            lines += [f"### What each compression bought: {pair}", "", families_table(rows, pair), "",
                      FAMILIES_NOTE, ""]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- `{r['run_id']}` ({r.get('error_kind') or 'error'}): {r.get('error')}" for r in failed] + [""]
    failed_variants = [(r, v) for r in results for v in r.get("failed_variants", [])]
    if failed_variants:
        lines += ["## Failed variants", "", "The runs themselves succeeded; only these compressed variants failed.", ""]
        lines += [f"- `{r['run_id']}` / `{v['name']}`: {v['error']}" for r, v in failed_variants] + [""]
    return "\n".join(lines)


def write_report(results_dir: Path, suite_name: str | None = None) -> str:
    """Write results_dir/README.md and the plots next to it; return the README text."""
    results_dir = Path(results_dir)
    results = read_results(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    plots = {task: write_plots(rows, results_dir) for task, rows in collect_rows(results).items()}
    text = render(results, suite_name or results_dir.name, plots)
    (results_dir / "README.md").write_text(text)
    return text
