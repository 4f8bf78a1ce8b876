"""The per-process state that the runs of one suite share: data, tokenizers, heads and teachers, built once.

`Context` memoises each by its key, and keeps the teacher and the student alone on disk under the suite's
cache_dir, keyed by a hash of everything they depend on (the spec, the data's fingerprint, the process count),
so a resumed or later suite loads them instead of training them again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kdbench import distributed
from kdbench.errors import KdbenchError
from kdbench.results import read_result, run_path
from kdbench.plan import RunSpec, spec_hash, tokenizer_tasks
from kdbench.suite import Suite

log = logging.getLogger(__name__)


class Context:
    """What the runs of one suite share in this process, each built once: data, tokenizers, heads, teachers."""

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
        has one vocabulary, so the group's teachers share it too), or the tasks that two-stage pairs link to it."""
        return tokenizer_tasks(self.suite, spec.task.name)

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
            tok = pair_tokenizer(teacher_models(spec.pair), spec.pair.student.model, texts, self.cache_dir,
                                 self.tokenizer_key(spec))
            self.pair_options(spec, tok)  # before any training: what the head needs of the models, or a refusal
            return tok

        return self.memo(("tokenizer", self.tokenizer_key(spec), spec.pair.name), build)

    def pair_options(self, spec: RunSpec, tokenizer=None) -> dict:
        """The head's settings for this pair's models (kdbench.heads.Head.pair_options): `encode`'s and
        `collator`'s keywords."""
        def ask():  # each teacher's, so that any a head refuses is refused; they share the tokenizer, hence these
            tok = tokenizer or self.tokenizer(spec)
            options = [self.head(spec).pair_options(t.model, spec.pair.student.model, tok, spec.pair.name)
                       for _, t in spec.pair.teacher_roles]
            return options[0]

        return self.memo(("pair_options", spec.task.name, spec.pair.name), ask)

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

    def teacher_key(self, spec: RunSpec, index: int | None = None) -> str:
        """The cache key of the pair's teacher, or of `teachers[index]` (default: the run's teacher_index); for the
        other runs of a pair with several teachers, of their ensemble (each one's key, the weights, the average)."""
        pair, index = spec.pair, spec.teacher_index if index is None else index
        if pair.teachers is not None and index is None:
            return spec_hash(["teachers", [self.teacher_key(spec, i) for i in range(len(pair.teachers))],
                              [t.weight for t in pair.teachers], pair.teacher_average])
        t = pair.teacher.model_dump(mode="json") if pair.teachers is None else pair.teachers[index].model_dump(
            mode="json", exclude={"weight"})  # its weight is the ensemble's: a teacher caches once, as a lone one
        # the tokenizer key holds the data's fingerprint, and a multitask group's shared tokenizer is another one
        return spec_hash(["teacher", spec.task.model_dump(mode="json"), t,
                          spec.training.max_seq_length, self.teacher_seed, self.tokenizer_key(spec),
                          *distributed.scope_key()])

    def teacher(self, spec: RunSpec, index: int | None = None):
        """(model, TrainStats) of the task's teacher, or of `teachers[index]` (default: the run's teacher_index,
        else the best of several by their runs' metric): loaded from the on-disk cache, or fine-tuned once and
        saved there."""
        index = spec.teacher_index if index is None else index
        if spec.pair.teachers is not None and index is None:
            index = self.best_teacher(spec)
            if index is None:
                raise KdbenchError(f"pair {spec.pair.name!r}: the best of its teachers is known once all of "
                                   f"their runs ({', '.join(teacher_run_ids(spec))}) have succeeded")
        return self.memo(("teacher", spec.task.name, spec.pair.name, index), lambda: self._build_teacher(spec, index))

    def distillation_teacher(self, spec: RunSpec, temperature: float):
        """What a student of `spec` distils from: the pair's teacher, or its teachers' ensemble, whose soft targets
        at `temperature` are their weighted average (kdbench.train.ensemble)."""
        pair = spec.pair
        if pair.teachers is None:
            return self.teacher(spec)[0]
        from kdbench.train.ensemble import TeacherEnsemble

        return self.memo(("ensemble", spec.task.name, pair.name, temperature), lambda: TeacherEnsemble(
            [self.teacher(spec, i)[0] for i in range(len(pair.teachers))], [t.weight for t in pair.teachers],
            temperature, pair.teacher_average))

    def _build_teacher(self, spec: RunSpec, index: int | None):
        from kdbench import models
        from kdbench.train import loop

        data = self.task_data(spec)
        tmodel = spec.pair.teacher if index is None else spec.pair.teachers[index]
        role = "teacher" if index is None else f"teachers.{index}"
        folder = self.cache_dir / "teachers" / self.teacher_key(spec, index)
        stats = None
        if distributed.broadcast((folder / "config.json").exists()):  # rank 0's answer: all ranks go one way
            model = models.load_saved(folder, self.head(spec))
            log.info("teacher loaded from cache %s", folder)
            stats = loop.TrainStats.load(folder)  # the fine-tuning that made it, reported as such
        else:
            if tmodel.finetune is None and not models.is_pretrained(tmodel.model):
                raise KdbenchError(f"pairs.{spec.pair.name}.{role}: an inline config needs `finetune:` settings")
            model = models.build_model(tmodel.model, head=self.head(spec), num_labels=data.num_labels,
                                       vocab_size=len(self.tokenizer(spec)), seed=self.teacher_seed)
            if tmodel.finetune is not None:
                # every rank trains it (DDP), so every rank holds the same weights; rank 0 alone saves them
                stats = loop.train(model, self.encoded(spec, "train"), self.collator(spec), tmodel.finetune,
                                   seed=self.teacher_seed, device=self.device, progress=self.progress,
                                   description=f"fine-tune {role} {spec.pair.name}", head=self.head(spec))
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
        from kdbench import models
        from kdbench.train import loop

        folder = self.cache_dir / "students" / self.student_alone_key(spec)
        if distributed.broadcast((folder / "config.json").exists()):
            model = models.load_saved(folder, self.head(spec))
            log.info("student alone loaded from cache %s", folder)
            return model.to(self.device), loop.TrainStats.load(folder)
        from kdbench.run.first_stage import initial_student

        model, before = initial_student(spec, self)  # a two-stage pair's: its first stage's distilled student
        stats = loop.train(model, self.encoded(spec, "train"), self.collator(spec), self.suite.training,
                           seed=spec.seed, device=self.device, progress=self.progress,
                           description=f"student alone, seed {spec.seed}", head=self.head(spec))
        if before is not None:
            stats = before.then(stats)
        if keep:
            distributed.on_main(lambda: save_model(model, folder, stats))
        return model, stats

    def collator(self, spec: RunSpec):
        return self.memo(("collator", spec.task.name, spec.pair.name),
                         lambda: self.head(spec).collator(self.tokenizer(spec), **self.pair_options(spec)))

    def teacher_metric(self, spec: RunSpec) -> float | None:
        """The metric that retention is against: the teacher run's, or the best of several teachers' (None unless
        every one succeeded)."""
        best = self.best_teacher(spec)
        return None if best is None else self.teacher_results(spec)[best][0]

    def best_teacher(self, spec: RunSpec) -> int | None:
        """The index in teacher_run_ids(spec) of the teacher with the best metric (the first of equals); None
        unless every teacher run succeeded."""
        found = self.teacher_results(spec)
        if any(r is None for r in found):
            return None
        sign = 1 if found[0][1] else -1
        return max(range(len(found)), key=lambda i: (sign * found[i][0], -i))

    def teacher_results(self, spec: RunSpec) -> list[tuple[float, bool] | None]:
        """(metric, higher_is_better) of each of teacher_run_ids(spec), None for a run that did not succeed."""
        def read():
            found = []
            for run_id in teacher_run_ids(spec):
                r = read_result(run_path(self.results_dir, run_id))
                ok = r and r.get("status") == "ok" and r["variants"][0].get("metric") is not None
                found.append((r["variants"][0]["metric"], r["variants"][0].get("higher_is_better", True)) if ok
                             else None)
            return found

        return distributed.on_main(read)  # rank 0 wrote them; every rank must take the same branch on them


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
    """The teacher run of `spec`'s (task, pair): its own teacher_index's with several teachers."""
    own = "" if spec.teacher_index is None else str(spec.teacher_index + 1)
    return f"{spec.task.name}__{spec.pair.name}__teacher{own}"


def teacher_run_ids(spec: RunSpec) -> list[str]:
    """Every teacher run that a run of `spec`'s (task, pair) needs: the pair's one, or one per teacher."""
    if spec.pair.teachers is None or spec.teacher_index is not None:
        return [teacher_run_id(spec)]
    return [f"{spec.task.name}__{spec.pair.name}__teacher{i + 1}" for i in range(len(spec.pair.teachers))]


def teacher_models(pair):
    """The model reference of the pair's teacher, or the list of its teachers' (kdbench.models.pair_tokenizer)."""
    return pair.teacher.model if pair.teachers is None else [t.model for t in pair.teachers]
