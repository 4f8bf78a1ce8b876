"""One function per kind of run: the teacher, the student alone, a distilled student, a multi-task group's.

Each returns the body of its RunResult (its profiled variants and training); `RUNNERS` maps a RunSpec's kind to it.
"""

from __future__ import annotations

from kdbench.errors import KdbenchError
from kdbench.run.context import Context, for_task, teacher_run_ids
from kdbench.run.measure import compressed_variants, profile_variant
from kdbench.run.first_stage import distilled_student
from kdbench.run.prepare import distiller
from kdbench.plan import RunSpec


def run_teacher(spec: RunSpec, ctx: Context) -> dict:
    model, stats = ctx.teacher(spec)
    variant = profile_variant("teacher", "teacher", model, spec, ctx, teacher_metric=None,
                              training=stats.as_dict() if stats else None)
    variant["retention"] = 1.0
    return {"variants": [variant], "training": variant["training"]}


def _require_teacher_metric(spec: RunSpec, ctx: Context) -> float:
    metric = ctx.teacher_metric(spec)  # the best teacher's, with several
    if metric is None:
        failed = next((rid for rid, r in zip(teacher_run_ids(spec), ctx.teacher_results(spec)) if r is None))
        raise KdbenchError(f"teacher run {failed} did not succeed; its students cannot run")
    return metric


def run_student(spec: RunSpec, ctx: Context) -> dict:
    teacher_metric = _require_teacher_metric(spec, ctx)
    # kept on disk when a method of the suite starts from it
    keep = any(m.start_from == "student" for m in ctx.suite.methods)
    student, stats = ctx.student_alone(spec, keep=keep)
    teacher, _ = ctx.teacher(spec)
    variant = profile_variant("student", "student", student, spec, ctx, teacher_metric=teacher_metric,
                              teacher=teacher, training=stats.as_dict())
    return {"variants": [variant], "training": stats.as_dict()}


def run_distill(spec: RunSpec, ctx: Context) -> dict:
    from kdbench.methods import make_objective

    teacher_metric = _require_teacher_metric(spec, ctx)
    teacher, _ = ctx.teacher(spec)
    objective = make_objective(spec.method.method, spec.method.params)
    distill = distiller(spec, ctx, objective)
    # Built like every other student (default attention): the Distiller switches it to eager attention only while
    # an objective that needs attention maps trains it, so all students are profiled the same way. A first stage's
    # is kept on disk for the pairs that start from it.
    student, stats = distilled_student(spec, ctx, distill)
    variants = [profile_variant("distilled", "distilled", student, spec, ctx, teacher_metric=teacher_metric,
                                teacher=teacher, training=stats.as_dict())]
    more, failed = compressed_variants(student, spec, ctx, teacher_metric, distill)
    return {"variants": variants + more, "failed_variants": failed, "training": stats.as_dict()}


def run_multitask(spec: RunSpec, ctx: Context) -> dict:
    """This task's part of the group's multi-task student (trained once per group, pair and seed, and cached on
    disk: kdbench.run.group.train_group)."""
    from kdbench.methods import make_objective
    from kdbench.run import group  # imports torch and transformers: only when a group runs
    from kdbench.train.multitask import describe_sharing

    teacher_metric = _require_teacher_metric(spec, ctx)
    for task in spec.group:
        _require_teacher_metric(for_task(spec, task), ctx)
    students, stats = ctx.memo(("multitask", spec.method.name, spec.pair.name, spec.seed),
                               lambda: group.train_group(spec, ctx))
    student = students[spec.task.name]
    teacher, _ = ctx.teacher(spec)
    variant = profile_variant("distilled", "distilled", student, spec, ctx, teacher_metric=teacher_metric,
                              teacher=teacher, training=stats.as_dict())
    variant["multitask"] = describe_sharing(students, spec.task.name)
    # recovery after pruning: this task's model alone, from its own teacher, with the group's method
    distill = distiller(spec, ctx, make_objective(spec.method.method, spec.method.params))
    more, failed = compressed_variants(student, spec, ctx, teacher_metric, distill)
    return {"variants": [variant] + more, "failed_variants": failed, "training": stats.as_dict()}


RUNNERS = {"teacher": run_teacher, "student": run_student, "distill": run_distill, "multitask": run_multitask}
