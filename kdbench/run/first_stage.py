"""Two-stage students (`student: {from_run: ...}`, kdbench.two_stage): the first stage's distilled student, kept on
disk, and the second stage's student built from it with its own task's head.

A distill run that is some pair's first stage saves its distilled student under cache_dir/first_stage, keyed by its
spec hash, its tokenizer and the process count, so it is trained once. A run that starts from it loads it; when a
resumed suite holds the first stage's result but not its model (a cleared cache), that run distils it again, seeded,
so it is the same student up to floating-point summation order (as Context.student_alone).
"""

from __future__ import annotations

import logging
from pathlib import Path

from kdbench import distributed
from kdbench.errors import KdbenchError
from kdbench.plan import RunSpec, first_stage_spec, spec_hash
from kdbench.run.context import Context, save_model
from kdbench.student_init import build_student

log = logging.getLogger(__name__)


def is_first_stage(spec: RunSpec, ctx: Context) -> bool:
    """Whether some pair's students start from `spec`'s distilled student."""
    if spec.kind != "distill":
        return False
    wanted = [p.student.from_run for p in ctx.suite.pairs if p.student.from_run is not None]
    return any((w.pair, w.task, w.method) == (spec.pair.name, spec.task.name, spec.method.name) for w in wanted)


def first_stage_folder(spec: RunSpec, ctx: Context) -> Path:
    """Where the first stage `spec` keeps its distilled student (a save_pretrained folder, with its TrainStats)."""
    key = spec_hash(["first_stage", spec.spec_hash, ctx.tokenizer_key(spec), *distributed.scope_key()])
    return ctx.cache_dir / "first_stage" / key


def distilled_student(spec: RunSpec, ctx: Context, distill):
    """(model, TrainStats) of a distill run's student: its initial student (or the student alone, for a method that
    starts from it) distilled by `distill`; a first stage's is loaded from the on-disk cache, or saved there. The
    stats count every training that made the model (the student alone's, a first stage's)."""
    from kdbench import models
    from kdbench.train import loop

    keep = is_first_stage(spec, ctx)
    folder = first_stage_folder(spec, ctx) if keep else None
    if keep and distributed.broadcast((folder / "config.json").exists()):
        log.info("first stage %s loaded from cache %s", spec.run_id, folder)
        return models.load_saved(folder, ctx.head(spec)).to(ctx.device), loop.TrainStats.load(folder)
    if spec.method.start_from == "student":
        student, before = ctx.student_alone(spec, keep=True)
    else:
        student, before = initial_student(spec, ctx)
    stats = distill(student, f"{spec.method.name}, seed {spec.seed}")
    if before is not None:  # the row's training is all of it: the student alone's or the first stage's, then this
        stats = before.then(stats)
    if keep:
        distributed.on_main(lambda: save_model(student, folder, stats))
    return student, stats


def initial_student(spec: RunSpec, ctx: Context):
    """(model, TrainStats or None) of `spec`'s student before its training: the pair's own (build_student), or a
    two-stage pair's first stage, distilled (loaded from its cache, or distilled now), given `spec`'s task head,
    with the stats of the training that made it."""
    data = ctx.task_data(spec)
    first = first_stage_spec(ctx.suite, spec.pair, spec.seed)
    folder, before = (None, None) if first is None else trained_first_stage(first, spec, ctx)
    model = build_student(spec.pair, head=ctx.head(spec), num_labels=data.num_labels,
                          vocab_size=len(ctx.tokenizer(spec)), seed=spec.seed, first_stage=folder)
    return model, before


def trained_first_stage(first: RunSpec, spec: RunSpec, ctx: Context):
    """(folder, TrainStats) of the first stage `first` of `spec`, distilled now if no cache holds it."""
    from kdbench.methods import make_objective
    from kdbench.run.prepare import distiller
    from kdbench.train import loop

    if ctx.tokenizer(first).get_vocab() != ctx.tokenizer(spec).get_vocab():
        raise KdbenchError(f"pairs.{spec.pair.name}.student.from_run: run {first.run_id}'s student has another "
                           "vocabulary than this pair's tokenizer; give both pairs models with one tokenizer")
    folder = first_stage_folder(first, ctx)
    if not distributed.broadcast((folder / "config.json").exists()):
        log.info("%s: its first stage %s is not in the cache; distilling it", spec.run_id, first.run_id)
        objective = make_objective(first.method.method, first.method.params)
        ctx.memo(("first_stage", first.spec_hash),
                 lambda: distilled_student(first, ctx, distiller(first, ctx, objective)))
    return folder, loop.TrainStats.load(folder)
