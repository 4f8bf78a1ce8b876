"""Rows of a report: which variant of which run goes on which line, aggregated over seeds, and the readers of
one variant's figures (each None when the figure was not measured)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

# Compressor registry keys by family; a variant's family comes from the steps it actually ran.
PRUNING = frozenset({"prune_structured", "prune_unstructured"})
QUANTIZATION = frozenset({"int8", "fp16", "bf16"})
FAMILIES = {
    "pruning": "structured or unstructured pruning of the distilled student",
    "quantization": "int8, fp16 or bf16 of the distilled student",
    "distillation": "the distilled student itself",
    "combined": "distillation + pruning + quantization",
}


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
    if spec.get("teacher_index") is not None:  # one of a pair's several teachers
        role += f" {spec['teacher_index'] + 1}"
    return role if variant["kind"] != "compressed" else f"{role} + {variant['name']}"


def _model_label(run: dict, variant: dict) -> str:
    from kdbench.models import describe
    from kdbench.suite import InlineConfig

    pair, index = run["spec"]["pair"], run["spec"].get("teacher_index")
    if variant["kind"] == "teacher" and index is not None:
        ref = pair["teachers"][index]["model"]
    else:
        ref = pair["teacher" if variant["kind"] == "teacher" else "student"]["model"]
    student = pair["student"] if variant["kind"] != "teacher" else {}
    derived = student.get("from_teacher") or student.get("from_run")  # fewer layers than the model it names
    if variant.get("architecture") and (derived or not isinstance(ref, str)):
        return variant["architecture"]  # measured off the built model; a hub name says more than its shape
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


def teacher_row(rows: list[Row], pair: str) -> Row | None:
    """The pair's teacher row; of several teachers, the best by metric (the first of equals), which the students'
    retention and speedup are measured against."""
    teachers = [r for r in rows if r.pair == pair and r.kind == "teacher"]
    measured = [r for r in teachers if r.mean(metric_of) is not None]
    if len(measured) < 2:
        return next(iter(measured or teachers), None)
    sign = metric_sign(measured)
    return max(measured, key=lambda r: sign * r.mean(metric_of))


def extra_metric_names(rows: list[Row]) -> list[str]:
    """Metrics recorded next to the task metric (a seq2seq task scored by exact match also records perplexity)."""
    names = {name: None for row in rows for v in row.variants for name in (v.get("extra_metrics") or {})}
    return list(names)


def distinct(values) -> list:
    return list(dict.fromkeys(values))
