"""The runner: executes a suite's runs in order, caching what it can and recording every outcome.

Order per (task, pair): the teacher (fine-tuned once and cached on disk by the hash of its spec), then per seed
the student alone and the student distilled by each method; each distilled student is also compressed into the
suite's variants. Every run writes one RunResult JSON; a run whose result exists with the same spec hash is
skipped (unless the task's data changed under it: the data key), so an interrupted suite resumes where it
stopped. A run that fails is recorded and the suite goes on.

Data parallel (several GPUs, or CPU processes): `torchrun --nproc_per_node N $(which kdbench) run suite.yaml`.
Every process (rank) runs this same loop over the same plan: rank 0 decides once, before anything runs, which runs
are pending, and every rank executes each of them in the same order, so the Trainer's DDP collectives line up
(`batch_size` is per process: a step takes batch_size x N rows). Every rank holds the same tokenizer (trained
deterministically), teacher and multi-task students (trained by all ranks together, or loaded from the cache when
rank 0 says it holds them), but rank 0 alone writes: the result JSONs, the report and the caches. Rank 0 alone
evaluates and profiles, on its own device, while the others wait; a failure there, or a non-finite loss on any
rank, is raised on every rank, so all record it and go on together; the ranks compare outcomes after each run.
kdbench.distributed holds the helpers. Results record the world size (`distributed`, and `world_size` in the
training stats) and count every rank's samples.
"""

from __future__ import annotations

import copy
import logging
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kdbench import distributed
from kdbench.errors import KdbenchError, RanksOutOfStepError
from kdbench.models import model_inputs
from kdbench.results import device_info, is_done, read_result, run_path, versions, write_result
from kdbench.suite import RunSpec, Suite, expand, group_of, spec_hash

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    run_id: str
    status: str  # "ok" | "failed" | "skipped" (already done)
    error: str | None = None
    error_kind: str | None = None  # "input" (bad input: exit 2) | "bug"
    failed_variants: list[dict] = field(default_factory=list)  # compressed variants that failed in an ok run


@dataclass
class SuiteOutcome:
    results_dir: Path
    runs: list[RunOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[RunOutcome]:
        return [r for r in self.runs if r.status == "failed"]

    @property
    def exit_code(self) -> int:
        """0: all ran; 2: bad input somewhere (a failed run or variant); 1: a bug."""
        if any(r.error_kind == "input" for r in self.failed) or any(r.failed_variants for r in self.runs):
            return 2
        return 1 if self.failed else 0


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise KdbenchError("device: cuda was requested but no CUDA device is available")
    return setting


def results_dir_for(suite: Suite, base: str | Path | None = None) -> Path:
    return Path(base or suite.output_dir) / suite.name


# ---------------------------------------------------------------------------------------------------------------
# Per-process state shared by the runs of one suite: data, tokenizers and teachers are built once.


class Context:
    def __init__(self, suite: Suite, results_dir: Path, device: str, progress=None):
        self.suite, self.results_dir, self.device, self.progress = suite, results_dir, device, progress
        self.cache_dir = Path(suite.cache_dir)
        self._memo: dict[tuple, Any] = {}

    def memo(self, key: tuple, build):
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def task_data(self, spec: RunSpec):
        from kdbench.tasks import load_task

        return self.memo(("task", spec.task.name), lambda: load_task(spec.task.task, spec.task.params))

    def tokenizer_scope(self, spec: RunSpec) -> list:
        """The tasks whose texts train the pair's tokenizer: the task alone, or its multitask group (whose student
        has one vocabulary, so the group's teachers share it too)."""
        return group_of(self.suite, spec.task.name)

    def data_fingerprint(self, spec: RunSpec) -> str:
        """A hash of the task's training rows. Cache keys hold it, so a cached tokenizer or teacher is never reused
        for other data under the same task spec (changed files, or a generator changed between versions)."""
        return self.memo(("fingerprint", spec.task.name),
                         lambda: spec_hash([self.task_data(spec).train, self.task_data(spec).transfer]))

    def data_key(self, spec: RunSpec) -> str | None:
        """What a run's result depends on beyond its spec: every split of its task (and of its multitask group,
        through the tokenizer key). A result is reused only under the same spec and data key. None when the data
        cannot be loaded: the run then fails and says why."""
        try:
            return self.memo(("data_key", spec.task.name), lambda: spec_hash(
                ["data", self.tokenizer_key(spec), self.task_data(spec).eval]))
        except KdbenchError as e:
            log.debug("no data key for %s: %s", spec.run_id, e)
            return None

    def tokenizer_key(self, spec: RunSpec) -> str:
        scope = [for_task(spec, t) for t in self.tokenizer_scope(spec)]
        return spec_hash(["tokenizer", [(s.task.model_dump(mode="json"), self.data_fingerprint(s)) for s in scope]])

    def tokenizer(self, spec: RunSpec):
        from kdbench.models import pair_tokenizer

        def build():
            scope = [for_task(spec, t) for t in self.tokenizer_scope(spec)]
            texts = [x for s in scope for x in self.head(s).texts(self.task_data(s).train)]  # a head knows its texts
            tok = pair_tokenizer(spec.pair.teacher.model, spec.pair.student.model, texts, self.cache_dir,
                                 self.tokenizer_key(spec))
            self.pair_options(spec, tok)  # before any training: what the head needs of the models, or a refusal
            return tok

        return self.memo(("tokenizer", self.tokenizer_key(spec), spec.pair.name), build)

    def pair_options(self, spec: RunSpec, tokenizer=None) -> dict:
        """The head's settings for this pair's models (kdbench.heads.Head.pair_options): `encode`'s and
        `collator`'s keywords."""
        return self.memo(("pair_options", spec.task.name, spec.pair.name), lambda: self.head(spec).pair_options(
            spec.pair.teacher.model, spec.pair.student.model, tokenizer or self.tokenizer(spec), spec.pair.name))

    def head(self, spec: RunSpec):
        """The task's head (kdbench.heads): model class, encoding, loss alignment, metric."""
        from kdbench import heads

        data = self.task_data(spec)
        return self.memo(("head", spec.task.name), lambda: heads.get(data.head, **data.head_params))

    def encoded(self, spec: RunSpec, split: str):
        """Tokenized rows of a split, encoded by the task's head."""

        def build():
            tok = self.tokenizer(spec)
            rows = getattr(self.task_data(spec), split)
            return self.head(spec).encode(rows, tok, spec.training.max_seq_length, **self.pair_options(spec))

        return self.memo(("encoded", spec.task.name, spec.pair.name, split), build)

    @property
    def teacher_seed(self) -> int:
        # The teacher run uses the suite's first seed; so must every student's teacher, whichever run asks first
        # (a resumed suite may start at a later seed's student).
        return self.suite.seeds[0]

    def teacher_key(self, spec: RunSpec) -> str:
        t = spec.pair.teacher
        # the tokenizer key holds the data's fingerprint, and a multitask group's shared tokenizer is another one
        return spec_hash(["teacher", spec.task.model_dump(mode="json"), t.model_dump(mode="json"),
                          spec.training.max_seq_length, self.teacher_seed, self.tokenizer_key(spec),
                          *distributed.scope_key()])

    def teacher(self, spec: RunSpec):
        """The task's teacher: loaded from the on-disk cache, or fine-tuned once and saved there."""
        return self.memo(("teacher", spec.task.name, spec.pair.name), lambda: self._build_teacher(spec))

    def _build_teacher(self, spec: RunSpec):
        from kdbench import models, trainer

        data = self.task_data(spec)
        tmodel = spec.pair.teacher
        folder = self.cache_dir / "teachers" / self.teacher_key(spec)
        stats = None
        if distributed.broadcast((folder / "config.json").exists()):  # rank 0's answer: all ranks go one way
            model = models.load_saved(folder, self.head(spec))
            log.info("teacher loaded from cache %s", folder)
            stats = trainer.TrainStats.load(folder)  # the fine-tuning that made it, reported as such
        else:
            if tmodel.finetune is None and not models.is_pretrained(tmodel.model):
                raise KdbenchError(f"pairs.{spec.pair.name}.teacher: an inline config needs `finetune:` settings")
            model = models.build_model(tmodel.model, head=self.head(spec), num_labels=data.num_labels,
                                       vocab_size=len(self.tokenizer(spec)), seed=self.teacher_seed)
            if tmodel.finetune is not None:
                # every rank trains it (DDP), so every rank holds the same weights; rank 0 alone saves them
                stats = trainer.train(model, self.encoded(spec, "train"), self.collator(spec), tmodel.finetune,
                                      seed=self.teacher_seed, device=self.device, progress=self.progress,
                                      description=f"fine-tune teacher {spec.pair.name}", head=self.head(spec))
                distributed.on_main(lambda: save_model(model, folder, stats))
        model.to(self.device).eval()
        return model, stats

    def student_alone_key(self, spec: RunSpec) -> str:
        """The cache key of the student alone that `spec`'s (task, pair, seed) trains: its own run's spec hash."""
        alone = spec.model_copy(update={"kind": "student", "method": None, "compression": [],
                                        "training": self.suite.training})
        return spec_hash(["student", alone.spec_hash, self.tokenizer_key(spec), *distributed.scope_key()])

    def student_alone(self, spec: RunSpec, *, keep: bool):
        """(model, TrainStats) of the student trained on the labels alone for `spec`'s task, pair and seed:
        loaded from the on-disk cache, or trained (and, with `keep`, saved there for the methods that start from
        it). Training is seeded, so a student trained again is the same student up to floating-point summation
        order (whole re-runs here reproduced every metric to 1e-6)."""
        from kdbench import models, trainer

        folder = self.cache_dir / "students" / self.student_alone_key(spec)
        if distributed.broadcast((folder / "config.json").exists()):
            model = models.load_saved(folder, self.head(spec))
            log.info("student alone loaded from cache %s", folder)
            return model.to(self.device), trainer.TrainStats.load(folder)
        data = self.task_data(spec)
        model = models.build_model(spec.pair.student.model, head=self.head(spec), num_labels=data.num_labels,
                                   vocab_size=len(self.tokenizer(spec)), seed=spec.seed)
        stats = trainer.train(model, self.encoded(spec, "train"), self.collator(spec), self.suite.training,
                              seed=spec.seed, device=self.device, progress=self.progress,
                              description=f"student alone, seed {spec.seed}", head=self.head(spec))
        if keep:
            distributed.on_main(lambda: save_model(model, folder, stats))
        return model, stats

    def collator(self, spec: RunSpec):
        return self.memo(("collator", spec.task.name, spec.pair.name),
                         lambda: self.head(spec).collator(self.tokenizer(spec), **self.pair_options(spec)))

    def teacher_metric(self, spec: RunSpec) -> float | None:
        def read():
            r = read_result(run_path(self.results_dir, teacher_run_id(spec)))
            return r["variants"][0]["metric"] if r and r.get("status") == "ok" else None

        return distributed.on_main(read)  # rank 0 wrote it; every rank must take the same branch on it


def save_model(model, folder: Path, stats) -> None:
    from kdbench.models import save_atomically

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        stats.save(tmp)  # so that a run that loads the teacher still reports what made it

    save_atomically(folder, write)  # a half-written teacher is never reused


def for_task(spec: RunSpec, task) -> RunSpec:
    """`spec` as seen from another task of its multitask group (that task's data, teacher and tokenizer)."""
    return spec if task.name == spec.task.name else spec.model_copy(update={"task": task})


def teacher_run_id(spec: RunSpec) -> str:
    return f"{spec.task.name}__{spec.pair.name}__teacher"


# ---------------------------------------------------------------------------------------------------------------
# Measurement of one model variant


def example_batch(spec: RunSpec, ctx: Context, batch_size: int) -> dict:
    """A padded batch of real eval inputs at the profiling sequence length (cycled if the split is small)."""
    rows = ctx.encoded(spec, "eval")
    seq = spec.profiling.seq_length or spec.training.max_seq_length
    picked = [rows[i % len(rows)] for i in range(batch_size)]
    batch = ctx.collator(spec)([{k: v for k, v in r.items() if k != "labels"} for r in picked])
    batch = {k: v for k, v in batch.items() if v is not None}  # seq2seq-style collators leave labels=None
    if batch["input_ids"].shape[-1] < seq:  # pad up to the profiling length so latency means what it says
        tok = ctx.tokenizer(spec)
        lead = batch["input_ids"].shape[:-1]  # (B,), or (B, choices) for multiple choice: pad every sequence
        batch = tok.pad({k: v.reshape(-1, v.shape[-1]).tolist() for k, v in batch.items()}, padding="max_length",
                        max_length=seq, return_tensors="pt")
        batch = {k: v.reshape(*lead, -1) for k, v in batch.items()}
    return {k: v[..., :seq] for k, v in batch.items()}


def measure_latency(model, spec: RunSpec, ctx: Context, teacher=None) -> tuple[dict, dict]:
    """(latency per batch size, speedup over `teacher` per batch size), timed with the suite's settings."""
    from kdbench import profiler

    p = spec.profiling
    if ctx.device == "cpu" and p.memory:
        profiler.wait_memory_server()  # never time a model while the server's start-up holds a core
    inputs_for = lambda m: lambda bs: model_inputs(example_batch(spec, ctx, bs), m)  # noqa: E731
    settings = dict(batch_sizes=p.batch_sizes, warmup=p.warmup, min_repeats=p.min_repeats,
                    max_repeats=p.max_repeats, time_budget_s=p.time_budget_s, device=ctx.device)
    latency = profiler.measure_latency(model, inputs_for(model), **settings)
    if teacher is None:
        return latency, {}
    return latency, profiler.measure_speedup(model, teacher, inputs_for(model), inputs_for(teacher), **settings)


def measure_decoding(model, spec: RunSpec, ctx: Context) -> dict:
    """Greedy generate() of `profiling.generate_tokens` new tokens per batch size (profiler.measure_generation),
    after the profiling batch's inputs: a seq2seq model's source, a causal LM's prompt, which is cut from the left
    so that prompt plus new tokens fit the model's positions."""
    from kdbench import profiler

    p = spec.profiling
    new = p.generate_tokens
    positions = getattr(model.config, "max_position_embeddings", None)  # GPT-2 maps n_positions to it
    keep = None
    if not model.config.is_encoder_decoder and positions is not None:
        keep = positions - new
        if keep < 1:
            raise KdbenchError(f"profiling.generate_tokens: {new} new tokens do not fit the model's {positions} "
                               "positions")

    def prompt(bs):
        batch = example_batch(spec, ctx, bs)
        return {k: v[..., -keep:] if keep else v for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    return profiler.measure_generation(model, prompt, new_tokens=new, pad_token_id=ctx.tokenizer(spec).pad_token_id,
                                       batch_sizes=p.batch_sizes, warmup=min(p.warmup, 1), min_repeats=p.min_repeats,
                                       max_repeats=p.max_repeats, time_budget_s=p.time_budget_s, device=ctx.device)


def profile_variant(name: str, kind: str, model, spec: RunSpec, ctx: Context, *, teacher_metric: float | None,
                    teacher=None, info: dict | None = None, training: dict | None = None) -> dict:
    """Quality, size, latency, memory and energy of one model variant, measured the same way for all.

    The speedup over `teacher` is timed in alternation with it (profiler.measure_speedup); the teacher's own row
    has `teacher=None` and a speedup of 1 by definition. Data parallel: measured on rank 0 alone (the others wait
    and get its dict, or its error).
    """
    return distributed.on_main(lambda: measure_variant(name, kind, model, spec, ctx, teacher_metric=teacher_metric,
                                                       teacher=teacher, info=info, training=training))


def measure_variant(name: str, kind: str, model, spec: RunSpec, ctx: Context, *, teacher_metric: float | None,
                    teacher=None, info: dict | None = None, training: dict | None = None) -> dict:
    """profile_variant's measurements, in this process."""
    from kdbench import profiler

    log.info("%s: measuring %s", spec.run_id, name)
    head = ctx.head(spec)
    metric, extra = head.measure(model, ctx.encoded(spec, "eval"), ctx.collator(spec), ctx.device)
    total, nonzero = profiler.count_parameters(model)
    latency, paired = measure_latency(model, spec, ctx, teacher)
    speedup = {bs: r["speedup"] for bs, r in paired.items()} if teacher is not None else {
        bs: 1.0 for bs in latency}
    largest = max(spec.profiling.batch_sizes)
    memory = None
    if spec.profiling.memory:
        memory = profiler.measure_peak_memory(
            model, lambda bs: model_inputs(example_batch(spec, ctx, bs), model), batch_size=largest, device=ctx.device
        )
    energy = profiler.measure_energy(
        model, lambda bs: model_inputs(example_batch(spec, ctx, bs), model), batch_size=largest, device=ctx.device
    )
    generation = measure_decoding(model, spec, ctx) if spec.profiling.generate_tokens and head.generates else None
    return {
        "name": name,
        "kind": kind,
        "metric_name": head.metric_name,
        "higher_is_better": head.higher_is_better,
        "metric": metric,
        "retention": head.retention(metric, teacher_metric),
        "extra_metrics": extra,
        "params": total,
        "nonzero_params": nonzero,
        "size": profiler.size_on_disk(model),
        "latency": latency,
        "speedup_vs_teacher": speedup,
        "speedup": paired,  # the paired measurement behind each speedup, with its method
        "memory": memory,
        "energy": energy,
        "generation": generation,
        "compression": info or {},
        "training": training,
    }


# ---------------------------------------------------------------------------------------------------------------
# The three kinds of run


def run_teacher(spec: RunSpec, ctx: Context) -> dict:
    model, stats = ctx.teacher(spec)
    variant = profile_variant("teacher", "teacher", model, spec, ctx, teacher_metric=None,
                              training=stats.as_dict() if stats else None)
    variant["retention"] = 1.0
    return {"variants": [variant], "training": variant["training"]}


def _require_teacher_metric(spec: RunSpec, ctx: Context) -> float:
    metric = ctx.teacher_metric(spec)
    if metric is None:
        raise KdbenchError(f"teacher run {teacher_run_id(spec)} did not succeed; its students cannot run")
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
    from kdbench import models
    from kdbench.methods import make_objective

    teacher_metric = _require_teacher_metric(spec, ctx)
    data = ctx.task_data(spec)
    teacher, _ = ctx.teacher(spec)
    objective = make_objective(spec.method.method, spec.method.params)
    # Built like every other student (default attention): the Distiller switches it to eager attention only while
    # an objective that needs attention maps trains it, so all students are profiled the same way.
    before = None
    if spec.method.start_from == "student":
        student, before = ctx.student_alone(spec, keep=True)
    else:
        student = models.build_model(spec.pair.student.model, head=ctx.head(spec), num_labels=data.num_labels,
                                     vocab_size=len(ctx.tokenizer(spec)), seed=spec.seed)
    distill = distiller(spec, ctx, objective)
    stats = distill(student, f"{spec.method.name}, seed {spec.seed}")
    if before is not None:  # the row's training is both: the student alone's, then the distillation's
        stats = before.then(stats)
    variants = [profile_variant("distilled", "distilled", student, spec, ctx, teacher_metric=teacher_metric,
                                teacher=teacher, training=stats.as_dict())]
    more, failed = compressed_variants(student, spec, ctx, teacher_metric, distill)
    return {"variants": variants + more, "failed_variants": failed, "training": stats.as_dict()}


def distiller(spec: RunSpec, ctx: Context, objective):
    """`distill(model, description, max_steps=None) -> TrainStats`: trains `model` from the task's teacher with
    `objective` on the labelled split plus the transfer set (which the teacher labels)."""
    from kdbench import trainer

    head = ctx.head(spec)
    check_and_bind(spec, ctx, objective)
    teacher, _ = ctx.teacher(spec)
    kd_rows = distillation_rows(spec, ctx, objective)
    if head.caches_teacher_logits and not (objective.needs_hidden_states or objective.needs_attentions):
        # Logits of a frozen teacher in eval mode do not change between epochs, seeds or methods: compute once.
        # Under data parallel each rank computes a share (distributed.map_sharded).
        kd_rows = ctx.memo(("teacher_logits", spec.task.name, spec.pair.name), lambda: distributed.map_sharded(
            lambda part: trainer.cache_teacher_logits(teacher, part, ctx.collator(spec), ctx.device), kd_rows,
            chunk=trainer.TEACHER_LOGITS_BATCH))
    collator = ctx.collator(spec)
    if objective.sparse_teacher is not None:  # a language model's teacher, run once per task, pair, k and T
        kind, size = objective.sparse_teacher
        temperature = objective.params.temperature
        kd_rows = ctx.memo((kind, spec.task.name, spec.pair.name, size, temperature),
                           lambda: sparse_teacher_rows(spec, ctx, teacher, kd_rows, collator, kind, size, temperature))
        collator = trainer.TopKCollator(collator)
        teacher = None  # the batches carry the teacher: the Distiller needs none

    def distill(model, description, max_steps=None):
        return trainer.train(model, kd_rows, collator, spec.training, seed=spec.seed, device=ctx.device,
                             teacher=teacher, objective=objective, progress=ctx.progress,
                             description=description, max_steps=max_steps, head=head)

    return distill


def sparse_teacher_rows(spec: RunSpec, ctx: Context, teacher, rows: list[dict], collator, kind: str, size: int,
                        temperature: float) -> list[dict]:
    """`rows` with the teacher's top-k tokens, or the tokens it drew (`kind` "teacher_top_k" or "teacher_samples"),
    attached by trainer.cache_teacher_top_k; made once per task, pair, kind, size and T and kept under
    cache_dir/sparse_teacher, so that a resumed or later suite does not run the teacher again. Under data parallel
    each rank computes a share, and rank 0 saves."""
    from kdbench import trainer
    from kdbench.models import save_atomically

    folder = ctx.cache_dir / "sparse_teacher" / spec_hash([kind, ctx.teacher_key(spec), size, temperature])
    path = folder / trainer.TOP_K_FILE
    if distributed.broadcast(path.exists()):
        saved = trainer.load_teacher_top_k(path, rows)
        if saved is not None:
            log.info("%s %d loaded from cache %s", kind, size, folder)
            return saved
        log.warning("%s does not fit this task's rows; running the teacher again", path)
    out = distributed.map_sharded(
        lambda part: trainer.cache_teacher_top_k(teacher, part, collator, ctx.device, k=size, temperature=temperature,
                                                 sampled=kind == "teacher_samples"),
        rows, chunk=trainer.TEACHER_LOGITS_BATCH)
    if distributed.is_main():
        save_atomically(folder, lambda tmp: trainer.save_teacher_top_k(tmp / trainer.TOP_K_FILE, out))
    return out


def distillation_rows(spec: RunSpec, ctx: Context, objective) -> list[dict]:
    """What a student is distilled on: the labelled split plus the transfer set, or, for sequence-level KD, the
    teacher's decoded outputs for their inputs."""
    rows = ctx.encoded(spec, "train") + ctx.encoded(spec, "transfer")
    if getattr(objective, "generates_targets", False):
        rows = teacher_decoded_rows(spec, ctx, objective.params, rows)
    return rows


def decoding_options(spec: RunSpec, ctx: Context, params, what: str) -> dict:
    """The keyword settings of the task head's `decoded_targets` for this pair and method (a seq2seq pair's
    decoder start and target prefix, a causal LM's prompt_length), or a one-line refusal naming `what` (the
    method's kind of KD) for a task that does not decode."""
    head = ctx.head(spec)
    if not hasattr(head, "decoded_targets"):
        raise KdbenchError(f"method {spec.method.name!r}: {what} needs a seq2seq or causal LM task; task "
                           f"{spec.task.name!r} has a {head.kind} head")
    options = dict(ctx.pair_options(spec))
    causal_only = [key for key in ("prompt_length", "prompt_loss") if getattr(params, key, None)]
    if causal_only and head.kind != "causal_lm":
        raise KdbenchError(f"method {spec.method.name!r}: {causal_only[0]} is for causal LM tasks; task "
                           f"{spec.task.name!r} has a {head.kind} head")
    if params.prompt_length is not None:
        options["prompt_length"] = params.prompt_length
    return options


def check_and_bind(spec: RunSpec, ctx: Context, objective) -> None:
    """Before a method trains on a task: refuse, in one line, what the task's head cannot serve (fused_linear or a
    cached sparse teacher on a classifier), and give on-policy KD the task's decoding."""
    from kdbench import trainer

    head = ctx.head(spec)
    trainer.fused_linear(objective, head, spec.method.name, spec.task.name)
    if objective.sparse_teacher is not None and not head.caches_teacher_top_k:
        raise KdbenchError(f"method {spec.method.name!r}: {objective.sparse_teacher[0]} caches a teacher's vocabulary "
                           f"logits at inputs that repeat every epoch (causal and seq2seq LM tasks); task "
                           f"{spec.task.name!r} is {head.kind}")
    if hasattr(objective, "bind"):
        bind_student_decoding(spec, ctx, objective)


def bind_student_decoding(spec: RunSpec, ctx: Context, objective) -> None:
    """On-policy KD: the student writes a share of its training batches; bind how, for this task and pair."""
    params, head = objective.params, ctx.head(spec)
    options = decoding_options(spec, ctx, params, "on-policy KD")
    tokenizer, max_len = ctx.tokenizer(spec), spec.training.max_seq_length
    if (params.prompt_length or 0) >= max_len:  # refused now, not at the first batch the student writes
        raise KdbenchError(f"method {spec.method.name!r}: prompt_length {params.prompt_length} leaves no room to "
                           f"continue within max_seq_length {max_len}")

    def write(model, rows, device):
        written = head.decoded_targets(model, rows, tokenizer, device, max_len=max_len,
                                       max_new_tokens=params.max_new_tokens or max_len,
                                       sample_temperature=params.sample_temperature, **options)
        return head.with_prompt_loss(written) if params.prompt_loss else written

    objective.bind(write, ctx.collator(spec), seed=spec.seed)


def teacher_decoded_rows(spec: RunSpec, ctx: Context, params, rows: list[dict]) -> list[dict]:
    """`rows` with the teacher's decoded outputs as their targets (and the gold rows too with `keep_references`);
    decoded once per task, pair and decoding setting."""
    head = ctx.head(spec)
    options = decoding_options(spec, ctx, params, "sequence-level KD")
    teacher, _ = ctx.teacher(spec)
    max_len = spec.training.max_seq_length
    # prompt_loss changes labels only: methods that differ in it share one decoding
    settings = (params.num_beams, params.max_new_tokens or max_len, params.prompt_length)
    decoded = ctx.memo(("decoded_targets", spec.task.name, spec.pair.name, settings), lambda: distributed.map_sharded(
        lambda part: head.decoded_targets(teacher, part, ctx.tokenizer(spec), ctx.device, max_len=max_len,
                                          num_beams=settings[0], max_new_tokens=settings[1], **options),
        rows, chunk=head.GENERATE_BATCH))  # under data parallel, a share per rank
    if params.prompt_loss:
        decoded = head.with_prompt_loss(decoded)
    return rows + decoded if params.keep_references else decoded


def compressed_variants(student, spec: RunSpec, ctx: Context, teacher_metric: float, distill):
    """(profiled variants, failures) of the suite's compression specs applied to a distilled `student`."""
    teacher, _ = ctx.teacher(spec)
    variants, failed = [], []
    # Each compressor checks its variant with one forward pass: on a real eval batch, shaped as the task's head
    # needs ((B, C, L) for multiple choice), not on random (B, L) tokens.
    check = {k: v.to(ctx.device) for k, v in model_inputs(example_batch(spec, ctx, 2), student).items()}
    for comp in spec.compression:
        try:
            model, info, recovery = compress_variant(student, comp, ctx, distill, inputs=check)
            variants.append(profile_variant(comp.name, "compressed", model, spec, ctx, teacher_metric=teacher_metric,
                                            teacher=teacher, info=info, training=recovery))
        except KdbenchError as e:  # one variant the model or device cannot take; the others still count
            log.error("%s: compression %s failed: %s", spec.run_id, comp.name, e)
            failed.append({"name": comp.name, "error": str(e)})
    return variants, failed


def compress_variant(student, comp, ctx: Context, distill, inputs: dict | None = None):
    """Apply a compression spec to a copy of `student`.

    With `recover_steps`, the student is distilled from the teacher for that many steps after the last step that
    leaves it trainable (pruning) and before the first that does not (quantization, casts).
    """
    from kdbench import compress

    steps = [(s.compressor, s.params) for s in comp.steps]
    split = next((i for i, (name, _) in enumerate(steps) if not compress.compressors.get(name).trainable), len(steps))
    model, info = compress.apply_variant(student, steps[:split], device=ctx.device, inputs=inputs) if split else (
        copy.deepcopy(student), {"steps": []})
    recovery = None
    if comp.recover_steps:
        with compress.frozen_sparsity(model):  # pruned weights stay zero while the survivors adapt
            recovery = distill(model, f"recover {comp.name}", max_steps=comp.recover_steps).as_dict()
        info["recovered_before_step"] = split
    if split < len(steps):
        model, rest = compress.apply_variant(model, steps[split:], device=ctx.device, inputs=inputs,
                                             copy_model=False)
        info["steps"] += rest["steps"]
    return model, info, recovery


def run_multitask(spec: RunSpec, ctx: Context) -> dict:
    """This task's part of the group's multi-task student (trained once per group, pair and seed, and cached on
    disk: kdbench.multitask.train_group)."""
    from kdbench import multitask
    from kdbench.methods import make_objective

    teacher_metric = _require_teacher_metric(spec, ctx)
    for task in spec.group:
        _require_teacher_metric(for_task(spec, task), ctx)
    students, stats = ctx.memo(("multitask", spec.method.name, spec.pair.name, spec.seed),
                               lambda: multitask.train_group(spec, ctx))
    student = students[spec.task.name]
    teacher, _ = ctx.teacher(spec)
    variant = profile_variant("distilled", "distilled", student, spec, ctx, teacher_metric=teacher_metric,
                              teacher=teacher, training=stats.as_dict())
    variant["multitask"] = multitask.describe_sharing(students, spec.task.name)
    # recovery after pruning: this task's model alone, from its own teacher, with the group's method
    distill = distiller(spec, ctx, make_objective(spec.method.method, spec.method.params))
    more, failed = compressed_variants(student, spec, ctx, teacher_metric, distill)
    return {"variants": [variant] + more, "failed_variants": failed, "training": stats.as_dict()}


RUNNERS = {"teacher": run_teacher, "student": run_student, "distill": run_distill, "multitask": run_multitask}


# ---------------------------------------------------------------------------------------------------------------
# The suite loop


def execute(spec: RunSpec, ctx: Context) -> dict:
    """Run one spec and return its RunResult (never raises for a failure inside the run)."""
    from transformers import set_seed

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    base = {"run_id": spec.run_id, "spec": spec.model_dump(mode="json"), "spec_hash": spec.spec_hash,
            "data_key": ctx.data_key(spec), "versions": versions(), "device": device_info(ctx.device),
            "started": started}
    if distributed.active():
        base["distributed"] = distributed.describe()
    try:
        set_seed(spec.seed)
        body = RUNNERS[spec.kind](spec, ctx)
        return {**base, "status": "ok", "error": None, "error_kind": None,
                "wall_s": round(time.perf_counter() - t0, 3), **body}
    except KdbenchError as e:
        log.info("%s failed: %s", spec.run_id, e)  # the CLI prints one line per failure at the end
        return {**base, "status": "failed", "error": str(e), "error_kind": "input",
                "wall_s": round(time.perf_counter() - t0, 3), "variants": []}
    except Exception as e:  # a bug: keep the traceback in the result, go on with the suite
        log.error("%s failed with a bug: %s: %s", spec.run_id, type(e).__name__, e)
        log.debug("traceback", exc_info=True)
        return {**base, "status": "failed", "error": f"{type(e).__name__}: {e}", "error_kind": "bug",
                "traceback": traceback.format_exc(), "wall_s": round(time.perf_counter() - t0, 3), "variants": []}


def finished(out: Path, spec: RunSpec, ctx: Context) -> bool:
    """Whether `spec` has a result in `out` that a resumed suite keeps: same spec, same data, same process count."""
    return is_done(run_path(out, spec.run_id), spec.spec_hash, ctx.data_key(spec),
                   world_size=distributed.world_size())


def agree(result: dict) -> dict:
    """Data parallel: rank 0's result, failed if any rank's run failed (with the first such rank's error), the same
    on every rank. Also the barrier that keeps the ranks in step between runs."""
    if not distributed.active():
        return result
    keys = ("status", "error", "error_kind", "traceback")
    try:
        ranks = distributed.gather({k: result.get(k) for k in keys}, bounded=True)
    except RanksOutOfStepError as e:
        if result["status"] == "ok":
            raise
        # this rank failed and the others never came: they are in a collective that will not finish
        raise RanksOutOfStepError(f"run {result['run_id']} failed on rank {distributed.rank()} while the other "
                                  f"ranks were still in it ({result['error']}); stopping the launch") from e
    bad = next(((i, r) for i, r in enumerate(ranks) if r["status"] != "ok"), None)
    if bad is None or bad[0] == 0:
        return result
    i, r = bad
    return {**result, **r, "error": f"rank {i}: {r['error']}", "variants": [], "failed_variants": []}


def select_runs(suite: Suite, patterns: list[str]) -> list[str]:
    """The run ids that match any of the glob `patterns` (`sst2__*`, `*__kd__s0`), plus the teacher runs they need
    (their own, and their multitask group's), in the suite's order. No match is a user error."""
    from fnmatch import fnmatchcase

    specs = expand(suite)
    chosen = [s for s in specs if any(fnmatchcase(s.run_id, p) for p in patterns)]
    if not chosen:
        raise KdbenchError(f"--only {' '.join(patterns)}: no run matches; run ids look like "
                           f"{specs[0].run_id} (`kdbench run --dry-run` lists them)")
    needed = {s.run_id for s in chosen}
    for s in chosen:
        needed |= {teacher_run_id(for_task(s, t)) for t in (s.group if s.kind == "multitask" else [s.task])}
    return [s.run_id for s in specs if s.run_id in needed]


def keep_finished(path: Path, result: dict) -> Path:
    """Where to write `result`: a failed re-run never overwrites a finished (ok) result; it goes to runs/failed/."""
    previous = read_result(path)
    if result["status"] != "ok" and previous and previous.get("status") == "ok":
        log.warning("%s failed again; its earlier ok result is kept", result["run_id"])
        return path.parent / "failed" / path.name
    return path


def run_suite(suite: Suite, results_dir: str | Path | None = None, *, rerun: bool = False, show_progress=True,
              only: list[str] | None = None) -> SuiteOutcome:
    """Run every pending run of `suite`, write the RunResults and the report; return what happened.

    Under torchrun every rank calls this and gets the same outcome (see the module's docstring); only rank 0
    writes and shows progress.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kdbench import report

    out = results_dir_for(suite, results_dir)
    specs = [s for s in expand(suite) if only is None or s.run_id in only]
    outcome = SuiteOutcome(out)
    device = distributed.setup(resolve_device(suite.device))  # this rank's device: cuda:<LOCAL_RANK> under torchrun
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True), disable=not (show_progress and distributed.is_main()),
                        transient=False)
    try:
        with progress:
            ctx = Context(suite, out, device, progress)
            if ctx.device == "cpu" and suite.profiling.memory and specs and distributed.is_main():
                from kdbench import profiler

                profiler.start_memory_server()  # boots (seconds) while the first model trains
            # decided once, before anything runs, and the same on every rank: a result that rank 0 writes while
            # another rank is still deciding must not make that rank skip a run the others execute
            pending = distributed.on_main(lambda: {
                s.run_id for s in specs
                if rerun or not finished(out, s, ctx)})
            runs_task = progress.add_task(f"suite {suite.name}", total=len(specs))
            for spec in specs:
                path = run_path(out, spec.run_id)
                if spec.run_id not in pending:
                    outcome.runs.append(RunOutcome(spec.run_id, "skipped"))
                else:
                    progress.update(runs_task, description=f"suite {suite.name}: {spec.run_id}")
                    # -v: one line per run and per profiled variant, for logs where no progress bar is drawn
                    log.info("%s: running", spec.run_id)
                    mine = execute(spec, ctx)
                    try:
                        result = agree(mine)
                    except RanksOutOfStepError:
                        # rank 0 writes, and keeps its own view of a run that failed on it; a run it saw succeed
                        # while another rank failed is not recorded as a success
                        if distributed.is_main() and mine["status"] != "ok":
                            write_result(keep_finished(path, mine), mine)
                        raise
                    log.info("%s: %s in %.1f s", spec.run_id, result["status"], result.get("wall_s") or 0.0)
                    distributed.on_main(lambda p=path, r=result: write_result(keep_finished(p, r), r))
                    outcome.runs.append(RunOutcome(spec.run_id, result["status"], result["error"],
                                                   result["error_kind"], result.get("failed_variants", [])))
                progress.advance(runs_task)
        distributed.on_main(lambda: report.write_report(out, suite_name=suite.name))
    finally:
        distributed.teardown()
    return outcome
