"""Reports: markdown tables and plots rendered from the RunResult JSONs, so `kdbench report DIR` can redo them.

`write_report(dir)` writes `dir/README.md` and, next to it, two PNG plots per task. Per task the README has:
  1. the variant table: one row per variant (the teacher, the student trained alone, each method's distilled
     student, each compressed variant), aggregated over seeds as mean ± sample std, with a "how measured"
     legend built from the `method` strings that the profiler recorded;
  2. "what should I ship": the best student, the smallest and the fastest within 1% of it, and the Pareto fronts;
  3. plots of quality vs latency and quality vs size, Pareto front marked;
  4. per pair, what each compression family (pruning, quantization, distillation, combined) bought in this suite.
`compare(dir_a, dir_b)` tabulates the changes between two results folders (two versions, two machines).

The metric is higher-is-better (accuracy) unless its variants say otherwise (`higher_is_better: false`, as for
perplexity); latency, size and memory are lower-is-better.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, NamedTuple

from tabulate import tabulate

from kdbench.results import read_results

log = logging.getLogger(__name__)

# Recommendations accept any student whose mean metric is at least (1 - TOLERANCE) x the best student's.
TOLERANCE = 0.01

# Compressor registry keys by family; a variant's family comes from the steps it actually ran.
PRUNING = frozenset({"prune_structured", "prune_unstructured"})
QUANTIZATION = frozenset({"int8", "fp16", "bf16"})
FAMILIES = {
    "pruning": "structured or unstructured pruning of the distilled student",
    "quantization": "int8, fp16 or bf16 of the distilled student",
    "distillation": "the distilled student itself",
    "combined": "distillation + pruning + quantization",
}


# ---------------------------------------------------------------------------------------------------------------
# Rows: which variant of which run goes on which line


class Stat(NamedTuple):
    mean: float
    std: float  # sample standard deviation (n - 1); 0.0 for a single value
    n: int


def summarise(values) -> Stat | None:
    """Mean ± sample std of the values that were measured; None when none were (never a made-up 0)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return Stat(statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))


# Readers of one variant dict (see runner.profile_variant); each returns None when the figure was not measured.
def metric_of(v: dict):
    return v.get("metric")


def retention_of(v: dict):
    return v.get("retention")


def size_of(v: dict):
    return (v.get("size") or {}).get("bytes")


def memory_of(v: dict):
    return (v.get("memory") or {}).get("peak_mb")


def energy_of(v: dict):
    return (v.get("energy") or {}).get("joules_per_sample")


def train_s_of(v: dict):
    return (v.get("training") or {}).get("wall_s")


def train_steps_of(v: dict):
    return (v.get("training") or {}).get("steps")


def latency_of(bs: str) -> Callable[[dict], float | None]:
    return lambda v: ((v.get("latency") or {}).get(bs) or {}).get("median_ms")


def decode_of(bs: str) -> Callable[[dict], float | None]:
    return lambda v: ((v.get("generation") or {}).get(bs) or {}).get("ms_per_token")


def speedup_of(bs: str) -> Callable[[dict], float | None]:
    return lambda v: (v.get("speedup_vs_teacher") or {}).get(bs)


def compression_family(variant: dict) -> str | None:
    """pruning | quantization | combined | distillation | other; None for the teacher and the student alone."""
    if variant["kind"] == "distilled":
        return "distillation"
    if variant["kind"] != "compressed":
        return None
    steps = {s["name"] for s in (variant.get("compression") or {}).get("steps", [])}
    if not steps or steps - PRUNING - QUANTIZATION:
        return "other"
    if steps & PRUNING and steps & QUANTIZATION:
        return "combined"
    return "pruning" if steps & PRUNING else "quantization"


def row_label(run: dict, variant: dict) -> str:
    spec = run["spec"]
    role = {"teacher": "teacher", "student": "student alone"}.get(spec["kind"]) or spec["method"]["name"]
    return role if variant["kind"] != "compressed" else f"{role} + {variant['name']}"


def _model_label(run: dict, variant: dict) -> str:
    from kdbench.models import describe
    from kdbench.suite import InlineConfig

    pair = run["spec"]["pair"]
    ref = pair["teacher" if variant["kind"] == "teacher" else "student"]["model"]
    return describe(ref if isinstance(ref, str) else InlineConfig.model_validate(ref))


@dataclass
class Row:
    """One line of a task table: one variant of one (task, pair), over the seeds (runs) that produced it."""

    task: str
    pair: str
    label: str  # "teacher", "student alone", "<method>", "<method> + <compression>"
    kind: str  # teacher | student | distilled | compressed
    family: str | None
    model: str
    members: list[tuple[dict, dict]] = field(default_factory=list)  # (RunResult, its variant dict), one per seed

    @property
    def variants(self) -> list[dict]:
        return [v for _, v in self.members]

    def stat(self, read: Callable[[dict], float | None]) -> Stat | None:
        return summarise(read(v) for v in self.variants)

    def mean(self, read: Callable[[dict], float | None]) -> float | None:
        s = self.stat(read)
        return s.mean if s else None


def collect_rows(results: list[dict]) -> dict[str, list[Row]]:
    """{task: [Row]} from the ok RunResults, ordered teacher, student alone, then each method and its variants."""
    rank = {"teacher": 0, "student": 1, "distill": 2, "multitask": 3}
    ok = sorted((r for r in results if r.get("status") == "ok"), key=lambda r: (rank[r["spec"]["kind"]], r["run_id"]))
    rows: dict[tuple, Row] = {}
    for run in ok:
        task, pair = run["spec"]["task"]["name"], run["spec"]["pair"]["name"]
        for v in run["variants"]:
            key = (task, pair, row_label(run, v))
            if key not in rows:
                rows[key] = Row(task, pair, key[2], v["kind"], compression_family(v), _model_label(run, v))
            rows[key].members.append((run, v))
    by_task: dict[str, list[Row]] = defaultdict(list)
    for row in rows.values():
        by_task[row.task].append(row)
    return dict(by_task)


def batch_sizes(rows: list[Row]) -> list[str]:
    """Profiled batch sizes of a task, ascending, as the string keys the JSON uses."""
    return sorted({bs for r in rows for v in r.variants for bs in (v.get("latency") or {})}, key=int)


def generation_batch_sizes(rows: list[Row]) -> list[str]:
    """Batch sizes whose generate() was timed (profiling.generate_tokens), ascending; none for most tasks."""
    return sorted({bs for r in rows for v in r.variants for bs in (v.get("generation") or {})}, key=int)


def metric_name(rows: list[Row]) -> str:
    return rows[0].variants[0].get("metric_name", "metric")


def metric_sign(rows: list[Row]) -> int:
    """+1 when a higher metric is better (accuracy), -1 when lower is (perplexity)."""
    return 1 if rows[0].variants[0].get("higher_is_better", True) else -1


def display_names(rows: list[Row]) -> list[str]:
    """Row labels, prefixed by the pair when a task has several pairs (so "teacher" stays unambiguous)."""
    several = len({r.pair for r in rows}) > 1
    return [f"{r.pair}: {r.label}" if several else r.label for r in rows]


# ---------------------------------------------------------------------------------------------------------------
# Numbers a person can read: three significant figures, "n/a" for anything not measured


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


def _table(header: list[str], body: list[list[str]], text_columns: int) -> str:
    # The pipe format writes the alignment row, so GitHub right-aligns the numeric columns.
    align = ["left"] * text_columns + ["right"] * (len(header) - text_columns)
    return tabulate(body, headers=header, tablefmt="pipe", disable_numparse=True, colalign=align)


# ---------------------------------------------------------------------------------------------------------------
# The variant table


def teacher_row(rows: list[Row], pair: str) -> Row | None:
    return next((r for r in rows if r.pair == pair and r.kind == "teacher"), None)


def extra_metric_names(rows: list[Row]) -> list[str]:
    """Metrics recorded next to the task metric (a seq2seq task scored by exact match also records perplexity)."""
    names = {name: None for row in rows for v in row.variants for name in (v.get("extra_metrics") or {})}
    return list(names)


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
    return _table(header, body, text_columns=3)


def task_tables(results: list[dict]) -> dict[str, str]:
    """{task name: markdown table} from RunResults (the CLI prints these after a run)."""
    return {task: task_table(rows) for task, rows in collect_rows(results).items()}


# ---------------------------------------------------------------------------------------------------------------
# How each figure was measured: the profiler's own `method` strings, deduplicated

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


# ---------------------------------------------------------------------------------------------------------------
# What each compression family bought: the families table of one (task, pair)


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
    return _table(header, body, text_columns=2)


FAMILIES_NOTE = (
    "Families: " + "; ".join(f"**{name}**: {what}" for name, what in FAMILIES.items()) + ". "
    "Every compressed variant starts from a distilled student, so its figures against the teacher include "
    "distillation's. The **base** columns isolate one step: a compressed variant against the distilled student "
    "it was made from (same run), the distilled student against the student trained alone from the same seed "
    "(the KD gain). **training s**: distillation plus any recovery steps; the teacher's fine-tuning is not "
    "included. Δ metric: mean ± std of the per-seed differences."
)


# ---------------------------------------------------------------------------------------------------------------
# What to ship: the Pareto front and a recommendation computed from it


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
    # (what, by which figure, its reader, how to show it); the figure is minimised among the close students
    costs = [("size", size_of, lambda s: fmt_bytes(s.mean))]
    if bss:
        costs.insert(0, (f"latency at batch {bss[-1]}", latency_of(bss[-1]), lambda s: f"{fmt_stat(s)} ms"))
    for word, (figure, read, show) in zip(["Fastest", "Smallest"] if bss else ["Smallest"], costs):
        measured = [r for r in close if r.stat(read)]
        if measured:
            # ties (e.g. the same file size) go to the better metric
            pick = min(measured, key=lambda r: (r.mean(read), -sign * r.mean(metric_of)))
            lines.append(f"- **{word} within {tolerance:.0%} of it** ({metric} {bound} {threshold:.3f}, by {figure}): "
                         f"`{names[id(pick)]}`, {show(pick.stat(read))}, {metric} "
                         f"{fmt_stat(pick.stat(metric_of), decimals=3)}.")
    for figure, read, _ in costs:
        measured = [r for r in rows if r.stat(metric_of) and r.stat(read)]
        front = pareto_front([(sign * r.mean(metric_of), r.mean(read)) for r in measured])
        lines.append(f"- Pareto front ({metric} vs {figure}, cheapest first): "
                     + ", ".join(f"`{names[id(measured[i])]}`" for i in front) + ".")
    margin = abs(best_metric.mean - threshold)
    if best_metric.n > 1 and best_metric.std > margin:
        lines.append(f"- Caution: the best student's seed spread (± {best_metric.std:.3f}) is wider than the "
                     f"{tolerance:.0%} margin ({margin:.3f}), so these picks are within noise at {best_metric.n} "
                     "seeds.")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Plots: quality against latency and against size, one point per row, the Pareto front marked


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "task"


def _colour_key(row: Row) -> str:
    return row.family or {"teacher": "teacher", "student": "student alone"}.get(row.kind, row.kind)


COLOURS = {"teacher": "black", "student alone": "grey", "distillation": "tab:blue", "pruning": "tab:green",
           "quantization": "tab:orange", "combined": "tab:purple", "other": "tab:brown"}


def plot_tradeoff(rows: list[Row], read_x: Callable, xlabel: str, title: str, path: Path,
                  x_format: Callable[[float], str] | None = None) -> bool:
    """One PNG: mean metric (y) against mean cost (x) with std error bars; False when nothing was measured."""
    # The object API with an Agg canvas: no pyplot, so no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    names = display_names(rows)
    points = [(row, name, row.stat(metric_of), row.stat(read_x)) for row, name in zip(rows, names)]
    points = [p for p in points if p[2] and p[3]]
    if not points:
        return False
    fig = Figure(figsize=(11, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.07, 0.11, 0.58, 0.8))
    # Variants often share a size or a latency, so points carry numbers and the names go in a key beside the
    # axes; neighbouring numbers get staggered heights so they stay legible.
    for k, (number, (row, name, y, x)) in enumerate(
            sorted(enumerate(points, 1), key=lambda p: (p[1][3].mean, p[1][2].mean))):
        key = _colour_key(row)
        ax.errorbar(x.mean, y.mean, xerr=x.std, yerr=y.std, fmt="o", capsize=3, color=COLOURS.get(key, "tab:red"),
                    label=key)
        ax.annotate(str(number), (x.mean, y.mean), xytext=(5, (3, -10, 12)[k % 3]), textcoords="offset points",
                    fontsize=8)
    front = pareto_front([(metric_sign(rows) * y.mean, x.mean) for _, _, y, x in points])
    fx, fy = [points[i][3].mean for i in front], [points[i][2].mean for i in front]
    # steps-post traces the attainable region: each front point's quality holds until a costlier one beats it
    ax.plot(fx, fy, "--", color="tab:red", drawstyle="steps-post", linewidth=1)
    ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="tab:red", label="Pareto front")
    xs = [x.mean for *_, x in points]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
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
    fig.savefig(path, format="png")
    return True


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


# ---------------------------------------------------------------------------------------------------------------
# The README


def _distinct(values) -> list:
    return list(dict.fromkeys(values))


def header_lines(results: list[dict]) -> list[str]:
    """Where and with what the runs were made; several values mean a suite resumed on another setup."""
    ok = [r for r in results if r.get("status") == "ok"] or results  # a failed run still says where it ran
    devices = _distinct(f"{r['device']['type']} ({r['device']['name']}), torch threads {r['device']['threads']}"
                        + (f" of {r['device']['cpus']} CPUs" if r["device"].get("cpus") else "") for r in ok)
    keys = _distinct(k for r in ok for k in r.get("versions", {}))
    versions = [f"{k} {'/'.join(map(str, vals))}" for k in keys
                if (vals := _distinct(r["versions"].get(k) for r in ok if r["versions"].get(k)))]
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
        lines += how_measured(rows) + multitask_notes(rows) + [""]
        lines += ["### What should I ship?", ""] + recommend(rows) + [""]
        lines += [f"![{title}]({name})" for title, name in (plots or {}).get(task, [])] + [""]
        for pair in _distinct(r.pair for r in rows):
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


# ---------------------------------------------------------------------------------------------------------------
# Comparing two results folders


def _side(results: list[dict], label: str, folder: Path) -> str:
    ok = [r for r in results if r.get("status") == "ok"]
    devices = _distinct(f"{r['device']['type']} ({r['device']['name']})" for r in ok)
    torch = _distinct(r["versions"].get("torch") for r in ok)
    kdb = _distinct(r["versions"].get("kdbench") for r in ok)
    return (f"- **{label}**: `{folder}`: {len(ok)} ok runs, {len(results) - len(ok)} failed; "
            f"{' | '.join(devices) or 'no device'}; torch {'/'.join(map(str, torch))}, "
            f"kdbench {'/'.join(map(str, kdb))}")


def compare(dir_a: Path, dir_b: Path) -> str:
    """Markdown: per task, each (pair, variant) row's metric, retention, extra metrics, latency, speedup over the
    teacher, decoding ms/token (where timed) and size in A and B, and the relative change B vs A; rows found on one
    side only are listed as such."""
    results_a, results_b = read_results(Path(dir_a)), read_results(Path(dir_b))
    rows_a, rows_b = collect_rows(results_a), collect_rows(results_b)
    lines = ["# kdbench compare", "", _side(results_a, "A", dir_a), _side(results_b, "B", dir_b), "",
             "Values are mean ± std over seeds; Δ: the relative change (B − A) / |A|; † the change is within the "
             "seed spread (|B − A| ≤ std A + std B).", ""]
    for task in _distinct(list(rows_a) + list(rows_b)):
        a = {(r.pair, r.label): r for r in rows_a.get(task, [])}
        b = {(r.pair, r.label): r for r in rows_b.get(task, [])}
        ta, tb = rows_a.get(task, []), rows_b.get(task, [])
        common = set(batch_sizes(ta)) & set(batch_sizes(tb))
        bs = max(common, key=int) if common else None
        # figures that only some tasks record, where both sides have them: the extra metrics (perplexity next to
        # exact match) and decoding speed at the largest batch size timed on both sides
        extras = [n for n in extra_metric_names(ta) if n in extra_metric_names(tb)]
        common_gen = set(generation_batch_sizes(ta)) & set(generation_batch_sizes(tb))
        gbs = max(common_gen, key=int) if common_gen else None
        reads = [("metric", metric_of, lambda s: fmt_stat(s, decimals=3)),
                 ("retention", retention_of, lambda s: fmt_stat(s, decimals=1, scale=100, suffix="%")),
                 *[(name, lambda v, n=name: (v.get("extra_metrics") or {}).get(n), lambda s: fmt_stat(s, decimals=3))
                   for name in extras],
                 (f"latency b{bs} ms", latency_of(bs) if bs else (lambda v: None), fmt_stat),
                 # paired with the teacher, so it repeats where absolute latency drifts with the machine's load
                 (f"speedup b{bs}", speedup_of(bs) if bs else (lambda v: None), lambda s: fmt_stat(s, suffix="x")),
                 *([(f"decode b{gbs} ms/token", decode_of(gbs), fmt_stat)] if gbs else []),
                 ("size", size_of, lambda s: fmt_bytes(s.mean) if s else "n/a")]
        header = ["pair", "variant"] + [h for name, _, _ in reads for h in (f"{name} A", f"{name} B", f"{name} Δ")]
        body = []
        for key in [k for k in _distinct(list(a) + list(b)) if k in a and k in b]:
            cells = list(key)
            for _, read, show in reads:
                sa, sb = a[key].stat(read), b[key].stat(read)
                cells += [show(sa), show(sb), fmt_change(sa, sb)]
            body.append(cells)
        lines += [f"## {task}", "", _table(header, body, text_columns=2) if body else "No row in both.", ""]
        only = [(side, key) for side, mine, other in (("A", a, b), ("B", b, a)) for key in mine if key not in other]
        lines += [f"- only in {side}: `{pair}: {label}`" for side, (pair, label) in only]
        lines += [""] if only else []
    return "\n".join(lines)
