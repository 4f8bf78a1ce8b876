"""A multitask group's one student (kdbench.train.multitask): trained once per group, pair and seed, and kept on
disk under cache_dir/multitask, so a suite resumed half-way through a group does not train it again.
"""

from __future__ import annotations

import torch

from kdbench import distributed
from kdbench.errors import KdbenchError
from kdbench.methods import make_objective
from kdbench.run.context import for_task
from kdbench.run.prepare import check_and_bind, distillation_rows
from kdbench.plan import spec_hash
from kdbench.train import loop
from kdbench.train.multitask import MultiTaskDistiller, MultiTaskStudent, build_students


def group_key(spec, ctx) -> str:
    """The cache key of a group's trained student: everything its training depends on (the method, the student,
    the training settings and seed, and each task's teacher, tokenizer and data)."""
    views = [for_task(spec, task) for task in spec.group]
    return spec_hash(["multitask", spec.method.model_dump(mode="json"), spec.pair.student.model_dump(mode="json"),
                      spec.training.model_dump(mode="json"), spec.seed,
                      [(ctx.teacher_key(v), ctx.data_key(v)) for v in views]])


def train_group(spec, ctx):
    """The group's multi-task student, ({task name: model}, TrainStats): loaded from the on-disk cache, or trained
    once and saved there, so a suite resumed half-way through a group does not train it again.

    Data parallel: rank 0 decides whether the cache holds it; every rank then loads it, or trains it (DDP, so all
    end with the same weights), and rank 0 alone saves it."""
    students = build_group(spec, ctx)
    folder = ctx.cache_dir / "multitask" / group_key(spec, ctx)
    weights = folder / WEIGHTS_FILE
    if distributed.broadcast(weights.exists()):  # the folder appears whole (save_group): its stats too
        MultiTaskStudent(students).load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        stats = loop.TrainStats.load(folder)
    else:
        stats = train_students(spec, ctx, students)
        distributed.on_main(lambda: save_group(students, stats, folder))
    for model in students.values():
        model.to(ctx.device).eval()
    return students, stats


WEIGHTS_FILE = "students.pt"


def save_group(students: dict, stats, folder) -> None:
    from kdbench.models import save_atomically

    def write(tmp) -> None:
        torch.save(MultiTaskStudent(students).state_dict(), tmp / WEIGHTS_FILE)
        stats.save(tmp)

    save_atomically(folder, write)  # a half-written group is never reused


def build_group(spec, ctx) -> dict:
    """The group's untrained students, {task name: model}, sharing one encoder."""
    views = [for_task(spec, task) for task in spec.group]
    heads = {type(ctx.head(v)).__name__ for v in views}
    if len(heads) > 1:
        raise KdbenchError(f"multitask {spec.method.name!r}: its tasks need one kind of head, got "
                           + ", ".join(sorted(heads)))
    return build_students(spec.pair.student.model, [(v.task.name, ctx.task_data(v).num_labels) for v in views],
                          head=ctx.head(spec), vocab_size=len(ctx.tokenizer(spec)), seed=spec.seed)


def train_students(spec, ctx, students: dict):
    """Distil the group's `students` together, each row from its own task's teacher; return the TrainStats."""
    views = [for_task(spec, task) for task in spec.group]
    parts, rows = [], []
    for k, v in enumerate(views):
        objective = make_objective(spec.method.method, spec.method.params)
        check_and_bind(v, ctx, objective)
        teacher = ctx.distillation_teacher(v, objective.teacher_temperature)  # several: their ensemble at its T
        parts.append((students[v.task.name], teacher, objective, ctx.head(v)))
        rows += [{**r, "task": k} for r in distillation_rows(v, ctx, objective)]
    # one tokenizer for the group, so any task's collator pads all the rows
    return loop.train(MultiTaskStudent(students), rows, ctx.collator(spec), spec.training, seed=spec.seed,
                      device=ctx.device, progress=ctx.progress, head=ctx.head(spec), distiller=MultiTaskDistiller,
                      parts=parts, description=f"{spec.method.name} ({len(views)} tasks), seed {spec.seed}")
