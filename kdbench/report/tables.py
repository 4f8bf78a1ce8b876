"""The tables of a report: the variant table per task, the narrow console summary, and what each compression
family bought per pair."""

from __future__ import annotations

import re
import textwrap

from tabulate import tabulate

from kdbench.report.formatting import fmt_bytes, fmt_count, fmt_ratio, fmt_stat, markdown_table
from kdbench.report.picks import recommend
from kdbench.report.rows import (
    FAMILIES, Row, batch_sizes, collect_rows, decode_of, distinct, energy_of, extra_metric_names,
    generation_batch_sizes, latency_of, memory_of, metric_name, metric_of, retention_of, size_of, speedup_of,
    summarise, teacher_row, train_s_of, train_steps_of,
)


def task_table(rows: list[Row]) -> str:
    """Markdown table: one line per variant, every figure as mean ± std over seeds."""
    bss = batch_sizes(rows)
    extras = extra_metric_names(rows)
    gbss = generation_batch_sizes(rows)
    header = (["pair", "variant", "model", "seeds", metric_name(rows), "retention", *extras, "params", "non-zero",
               "size", "size ÷"] + [f"latency b{b} ms" for b in bss] + [f"speedup b{b}" for b in bss]
              + [f"decode b{b} ms/token" for b in gbss]
              + ["peak MB", "J/sample", "train s", "train steps"])
    body = []
    for row in rows:
        teacher = teacher_row(rows, row.pair)
        params = row.mean(lambda v: v.get("params"))
        nonzero = row.stat(lambda v: v["nonzero_params"] / v["params"] if v.get("params") else None)
        body.append(
            [row.pair, row.label, row.model, str(len(row.members)),
             fmt_stat(row.stat(metric_of), decimals=3),
             fmt_stat(row.stat(retention_of), decimals=1, scale=100, suffix="%"),
             *[fmt_stat(row.stat(lambda v, n=name: (v.get("extra_metrics") or {}).get(n)), decimals=3)
               for name in extras],
             fmt_count(params) if params else "n/a",
             fmt_stat(nonzero, decimals=1, scale=100, suffix="%"),
             fmt_bytes(row.mean(size_of)),
             fmt_ratio(teacher and teacher.mean(size_of), row.mean(size_of))]
            + [fmt_stat(row.stat(latency_of(b))) for b in bss]
            + [fmt_stat(row.stat(speedup_of(b)), suffix="x") for b in bss]
            + [fmt_stat(row.stat(decode_of(b))) for b in gbss]
            + [fmt_stat(row.stat(memory_of)), fmt_stat(row.stat(energy_of)), fmt_stat(row.stat(train_s_of)),
               fmt_stat(row.stat(train_steps_of), decimals=0)]
        )
    return markdown_table(header, body, text_columns=3)


def task_tables(results: list[dict]) -> dict[str, str]:
    """{task name: markdown table} from RunResults (the report's full tables)."""
    return {task: task_table(rows) for task, rows in collect_rows(results).items()}


def summary_table(rows: list[Row]) -> str:
    """The narrow table the console shows after a run: variant, metric ± spread, retention, size ÷, speedup."""
    bss = batch_sizes(rows)
    pairs = distinct(r.pair for r in rows)
    header = (["pair"] if len(pairs) > 1 else []) + ["variant", metric_name(rows), "retention", "size ÷"]
    header += [f"speedup b{bss[-1]}"] if bss else []
    body = []
    for row in rows:
        teacher = teacher_row(rows, row.pair)
        line = ([row.pair] if len(pairs) > 1 else []) + [
            row.label, fmt_stat(row.stat(metric_of), decimals=3),
            fmt_stat(row.stat(retention_of), decimals=1, scale=100, suffix="%"),
            fmt_ratio(teacher and teacher.mean(size_of), row.mean(size_of))]
        body.append(line + ([fmt_stat(row.stat(speedup_of(bss[-1])), suffix="x")] if bss else []))
    return tabulate(body, headers=header, tablefmt="simple", disable_numparse=True)


def console_summary(results: list[dict]) -> str:
    """Per task: the narrow summary table, then the "What should I ship?" picks (plain text, for a terminal)."""
    parts = []
    for task, rows in collect_rows(results).items():
        picks = [textwrap.fill(re.sub(r"[*`]", "", line), width=100, subsequent_indent="  ")
                 for line in recommend(rows)]
        parts += [f"== {task} ({len(distinct(r['run_id'] for row in rows for r, _ in row.members))} runs)", "",
                  summary_table(rows), "", "What should I ship?", *picks, ""]
    return "\n".join(parts)


def _base_variant(run: dict, v: dict, students_by_seed: dict[int, dict]) -> dict | None:
    """What a variant was made from: a compressed variant from its run's distilled student; a distilled student
    is compared with the student trained alone from the same seed (same initialisation)."""
    if v["kind"] == "compressed":
        return next((b for b in run["variants"] if b["kind"] == "distilled"), None)
    if v["kind"] == "distilled":
        return students_by_seed.get(run["spec"]["seed"])
    return None


def total_train_s(run: dict, v: dict) -> float | None:
    """Training behind a variant: the run's distillation plus, for a compressed variant, its recovery steps."""
    base = (run.get("training") or {}).get("wall_s")
    if base is None:
        return None
    return base + ((train_s_of(v) or 0.0) if v["kind"] == "compressed" else 0.0)


def families_table(rows: list[Row], pair: str) -> str:
    """Per compression family: size, quality, speed and training cost against the teacher and against the base."""
    pair_rows = [r for r in rows if r.pair == pair]
    bs = batch_sizes(rows)[-1] if batch_sizes(rows) else None
    teacher = teacher_row(pair_rows, pair)
    teacher_size = teacher.mean(size_of) if teacher else None
    student = next((r for r in pair_rows if r.kind == "student"), None)
    students_by_seed = {run["spec"]["seed"]: v for run, v in (student.members if student else [])}
    header = ["family", "variant", "seeds", "size ÷ teacher", "retention", f"speedup b{bs}", "training s",
              "size ÷ base", "Δ metric vs base"]
    body = []
    present = list(FAMILIES) + sorted({r.family for r in pair_rows if r.family} - set(FAMILIES))
    for family in present:
        members = [r for r in pair_rows if r.family == family]
        if not members:
            body.append([family, "not measured"] + [""] * (len(header) - 2))
        for i, row in enumerate(members):
            bases = [(v, b) for run, v in row.members if (b := _base_variant(run, v, students_by_seed))]
            body.append([
                family if i == 0 else "", row.label, str(len(row.members)),
                fmt_ratio(teacher_size, row.mean(size_of)),
                fmt_stat(row.stat(retention_of), decimals=1, scale=100, suffix="%"),
                fmt_stat(row.stat(speedup_of(bs)), suffix="x") if bs else "n/a",
                fmt_stat(summarise(total_train_s(run, v) for run, v in row.members)),
                fmt_stat(summarise(size_of(b) / size_of(v) for v, b in bases if size_of(b) and size_of(v)),
                         suffix="x"),
                fmt_stat(summarise(metric_of(v) - metric_of(b) for v, b in bases
                                   if metric_of(v) is not None and metric_of(b) is not None), decimals=3, signed=True),
            ])
    return markdown_table(header, body, text_columns=2)


FAMILIES_NOTE = (
    "Families: " + "; ".join(f"**{name}**: {what}" for name, what in FAMILIES.items()) + ". "
    "Every compressed variant starts from a distilled student, so its figures against the teacher include "
    "distillation's. The **base** columns isolate one step: a compressed variant against the distilled student "
    "it was made from (same run), the distilled student against the student trained alone from the same seed "
    "(the KD gain). **training s**: distillation plus any recovery steps; the teacher's fine-tuning is not "
    "included. Δ metric: mean ± std of the per-seed differences."
)
