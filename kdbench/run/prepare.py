"""Preparing a method's training on a task: its rows, its teacher caches, its decoding, and the refusals.

The runner asks the Objective what it needs (kdbench.methods.base: `sparse_teacher`, `teacher_decoding`,
`student_decoding`, `teacher_logits_suffice`, and `teacher_temperature`, at which several teachers are averaged)
and serves it here for the task's head; nothing here names a method.
`distiller` returns the `distill(model, description, max_steps)` that a run (and each recovery after pruning) trains
with.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kdbench import distributed
from kdbench.errors import KdbenchError
from kdbench.run.context import Context
from kdbench.plan import RunSpec, spec_hash

log = logging.getLogger(__name__)


def distiller(spec: RunSpec, ctx: Context, objective):
    """`distill(model, description, max_steps=None) -> TrainStats`: trains `model` from the task's teacher with
    `objective` on the labelled split plus the transfer set (which the teacher labels)."""
    from kdbench.train import loop, teacher_cache

    head = ctx.head(spec)
    check_and_bind(spec, ctx, objective)
    temperature = objective.teacher_temperature
    teacher = ctx.distillation_teacher(spec, temperature)  # several teachers: their ensemble at the method's T
    kd_rows = distillation_rows(spec, ctx, objective)
    rows = rows_key(spec, ctx, kd_rows)
    if head.caches_teacher_logits and objective.teacher_logits_suffice:
        # Logits of a frozen teacher in eval mode do not change between epochs, seeds or methods: compute once.
        # Under data parallel each rank computes a share (distributed.map_sharded).
        ensemble_t = None if spec.pair.teachers is None else temperature  # an ensemble's logits depend on T
        key = ("teacher_logits", spec.task.name, spec.pair.name, rows, ensemble_t)
        kd_rows = ctx.memo(key, lambda: distributed.map_sharded(
            lambda part: teacher_cache.cache_teacher_logits(teacher, part, ctx.collator(spec), ctx.device), kd_rows,
            chunk=teacher_cache.TEACHER_LOGITS_BATCH))
    collator = ctx.collator(spec)
    sparse = objective.sparse_teacher
    if sparse is not None:  # a language model's teacher, run once per task, pair, kind, size and T
        kd_rows = ctx.memo((sparse.kind, spec.task.name, spec.pair.name, sparse.size, sparse.temperature, rows),
                           lambda: sparse_teacher_rows(spec, ctx, teacher, kd_rows, collator, sparse, rows))
        collator = teacher_cache.TopKCollator(collator)
        teacher = None  # the batches carry the teacher: the Distiller needs none

    def distill(model, description, max_steps=None):
        return loop.train(model, kd_rows, collator, spec.training, seed=spec.seed, device=ctx.device,
                          teacher=teacher, objective=objective, progress=ctx.progress,
                          description=description, max_steps=max_steps, head=head)

    return distill


def rows_key(spec: RunSpec, ctx: Context, rows: list[dict]) -> str:
    """What a teacher cache made for `rows` is kept under: "data" for the task's own training rows (the labelled
    split plus the transfer set, which every method but one with its own `training_rows` trains on), else a hash
    of the rows."""
    return "data" if rows == ctx.encoded(spec, "train") + ctx.encoded(spec, "transfer") else spec_hash(rows)


def sparse_teacher_folder(spec: RunSpec, ctx: Context, sparse, rows_key: str = "data") -> Path:
    """Where sparse_teacher_rows keeps the teacher's top-k or drawn tokens for `spec`'s rows (a path under the
    cache, the same on every node: `kdbench run --ray` moves it between them)."""
    key = [sparse.kind, ctx.teacher_key(spec), sparse.size, sparse.temperature]
    key += [] if rows_key == "data" else [rows_key]  # the data's own rows: the key they always had
    return ctx.cache_dir / "sparse_teacher" / spec_hash(key)


def sparse_teacher_rows(spec: RunSpec, ctx: Context, teacher, rows: list[dict], collator, sparse,
                        rows_key: str = "data") -> list[dict]:
    """`rows` with the teacher's top-k tokens, or the tokens it drew (`sparse`, a methods.base.SparseTeacher),
    attached by teacher_cache.cache_teacher_top_k; made once per task, pair, kind, size, T and rows (`rows_key`)
    and kept under cache_dir/sparse_teacher, so that a resumed or later suite does not run the teacher again.
    Under data parallel each rank computes a share, and rank 0 saves."""
    from kdbench.models import save_atomically
    from kdbench.train import teacher_cache

    kind, size, temperature = sparse.kind, sparse.size, sparse.temperature
    folder = sparse_teacher_folder(spec, ctx, sparse, rows_key)
    path = folder / teacher_cache.TOP_K_FILE
    if distributed.broadcast(path.exists()):
        saved = teacher_cache.load_teacher_top_k(path, rows)
        if saved is not None:
            log.info("%s %d loaded from cache %s", kind, size, folder)
            return saved
        log.warning("%s does not fit this task's rows; running the teacher again", path)
    out = distributed.map_sharded(
        lambda part: teacher_cache.cache_teacher_top_k(teacher, part, collator, ctx.device, k=size,
                                                       temperature=temperature, sampled=kind == "teacher_samples"),
        rows, chunk=teacher_cache.TEACHER_LOGITS_BATCH)
    if distributed.is_main():
        save_atomically(folder, lambda tmp: teacher_cache.save_teacher_top_k(tmp / teacher_cache.TOP_K_FILE, out))
    return out


def distillation_rows(spec: RunSpec, ctx: Context, objective) -> list[dict]:
    """What a student is distilled on (`objective.training_rows`): the labelled split plus the transfer set, and
    the teacher's decoded outputs for their inputs when the objective asks for them (`teacher_decoding`)."""
    rows = ctx.encoded(spec, "train") + ctx.encoded(spec, "transfer")
    decoding = objective.teacher_decoding
    decoded = None if decoding is None else teacher_decoded_rows(spec, ctx, decoding, rows)
    return objective.training_rows(rows, decoded)


def decoding_options(spec: RunSpec, ctx: Context, decoding) -> dict:
    """The keyword settings of the task head's `decoded_targets` for this pair and `decoding` (a seq2seq pair's
    decoder start and target prefix, a causal LM's prompt_length), or a one-line refusal naming the method's kind
    of KD (`decoding.what`) for a task that does not decode."""
    head = ctx.head(spec)
    if not hasattr(head, "decoded_targets"):
        raise KdbenchError(f"method {spec.method.name!r}: {decoding.what} needs a seq2seq or causal LM task; task "
                           f"{spec.task.name!r} has a {head.kind} head")
    options = dict(ctx.pair_options(spec))
    causal_only = [key for key in ("prompt_length", "prompt_loss") if getattr(decoding, key)]
    if causal_only and head.kind != "causal_lm":
        raise KdbenchError(f"method {spec.method.name!r}: {causal_only[0]} is for causal LM tasks; task "
                           f"{spec.task.name!r} has a {head.kind} head")
    if decoding.prompt_length is not None:
        options["prompt_length"] = decoding.prompt_length
    return options


def check_and_bind(spec: RunSpec, ctx: Context, objective) -> None:
    """Before a method trains on a task: refuse, in one line, what the task's head cannot serve (fused_linear or a
    cached sparse teacher on a classifier), and give an objective that has the student write its own batches the
    task's decoding."""
    from kdbench.train.distiller import fused_linear

    head = ctx.head(spec)
    fused_linear(objective, head, spec.method.name, spec.task.name)
    sparse = objective.sparse_teacher
    if sparse is not None and not head.caches_teacher_top_k:
        raise KdbenchError(f"method {spec.method.name!r}: {sparse.kind} caches a teacher's vocabulary logits at "
                           f"inputs that repeat every epoch (causal and seq2seq LM tasks); task {spec.task.name!r} "
                           f"is {head.kind}")
    if objective.student_decoding is not None:
        bind_student_decoding(spec, ctx, objective)


def bind_student_decoding(spec: RunSpec, ctx: Context, objective) -> None:
    """The student writes a share of its training batches (`objective.student_decoding`): bind how, for this task
    and pair."""
    decoding, head = objective.student_decoding, ctx.head(spec)
    options = decoding_options(spec, ctx, decoding)
    tokenizer, max_len = ctx.tokenizer(spec), spec.training.max_seq_length
    if (decoding.prompt_length or 0) >= max_len:  # refused now, not at the first batch the student writes
        raise KdbenchError(f"method {spec.method.name!r}: prompt_length {decoding.prompt_length} leaves no room to "
                           f"continue within max_seq_length {max_len}")

    def write(model, rows, device):
        written = head.decoded_targets(model, rows, tokenizer, device, max_len=max_len,
                                       max_new_tokens=decoding.max_new_tokens or max_len,
                                       sample_temperature=decoding.sample_temperature, **options)
        return head.with_prompt_loss(written) if decoding.prompt_loss else written

    objective.bind(write, ctx.collator(spec), seed=spec.seed)


def teacher_decoded_rows(spec: RunSpec, ctx: Context, decoding, rows: list[dict]) -> list[dict]:
    """`rows` with the teacher's decoded outputs as their targets, decoded once per task, pair and decoding
    setting."""
    head = ctx.head(spec)
    options = decoding_options(spec, ctx, decoding)
    teacher, _ = ctx.teacher(spec)
    max_len = spec.training.max_seq_length
    # prompt_loss changes labels only: methods that differ in it share one decoding
    settings = (decoding.num_beams, decoding.max_new_tokens or max_len, decoding.prompt_length)
    decoded = ctx.memo(("decoded_targets", spec.task.name, spec.pair.name, settings), lambda: distributed.map_sharded(
        lambda part: head.decoded_targets(teacher, part, ctx.tokenizer(spec), ctx.device, max_len=max_len,
                                          num_beams=settings[0], max_new_tokens=settings[1], **options),
        rows, chunk=head.GENERATE_BATCH))  # under data parallel, a share per rank
    return head.with_prompt_loss(decoded) if decoding.prompt_loss else decoded
