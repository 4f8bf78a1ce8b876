"""A suite expanded into runs: one RunSpec per (task, pair, role, seed), whose hash keys its result and caches."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kdbench.suite import CompressionSpec, MethodSpec, PairSpec, ProfilingSettings, Suite, TaskSpec, TrainingSettings
from kdbench.suite_checks import method_training
from kdbench.two_stage import first_stage_pair, linked_tasks, stage_depth


class RunSpec(BaseModel):
    """One unit of work: a (task, pair, role, seed). Its hash is the cache key of its result."""

    model_config = ConfigDict(frozen=True)

    suite: str
    kind: Literal["teacher", "student", "distill", "multitask"]
    task: TaskSpec  # a multitask run trains the group's student once and reports this task's part of it
    pair: PairSpec
    method: MethodSpec | None = None  # for a multitask run: the group's name with its method's key and params
    group: list[TaskSpec] = Field(default_factory=list)  # the task's multitask group, in order (else empty)
    seed: int
    teacher_index: int | None = None  # a teacher run of a pair with `teachers`: which one (0-based)
    # a two-stage student's (`from_run`): the spec hash of the run whose distilled student it starts from, so that a
    # change to the first stage re-runs the second
    first_stage: str | None = None
    training: TrainingSettings
    compression: list[CompressionSpec] = Field(default_factory=list)
    profiling: ProfilingSettings

    @property
    def run_id(self) -> str:
        role = {"teacher": "teacher", "student": "student"}.get(self.kind) or self.method.name
        if self.teacher_index is not None:
            role += str(self.teacher_index + 1)  # teacher1, teacher2, ...
        seed = "" if self.kind == "teacher" else f"__s{self.seed}"
        return f"{self.task.name}__{self.pair.name}__{role}{seed}"

    @property
    def spec_hash(self) -> str:
        # `group` is left out when empty, so single-task runs keep the hashes they had before multitask existed;
        # so are the pair's and the method's task lists, which decide whether a run exists, not what it does,
        # and so is the method's `training`: what it changes is in `training` itself
        # and so is a default `start_from`, so that runs from before it existed keep their hashes
        # and so are the method's `resources`, which say where it runs, not what it computes
        exclude: dict = {"pair": {"tasks"}, "method": {"training", "tasks", "resources"}}
        if self.method is not None and self.method.start_from == "init":
            exclude["method"] = {"training", "tasks", "start_from", "resources"}
        if not self.group:
            exclude["group"] = True
        if self.teacher_index is None:  # a one-teacher pair's runs keep the hashes they had before `teachers`
            exclude["teacher_index"] = True
        if self.first_stage is None:  # and a one-stage student's runs the hashes they had before `from_run`
            exclude["first_stage"] = True
        return spec_hash(self.model_dump(mode="json", exclude=exclude))


def spec_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expand(suite: Suite) -> list[RunSpec]:
    """Per (task, pair): the teacher once, then per seed the student alone and each method. Then, per multitask
    group, pair and seed, one run per task of the group (they share one trained student), after every teacher.

    Baselines are shared by all methods. Compression variants apply to every distilled student, so
    the table shows each method both uncompressed and compressed.
    """
    runs, multitask = [], []
    for task in suite.tasks:
        for pair in (p for p in suite.pairs if p.runs_on(task.name)):
            group = group_of(suite, task.name)
            # A grouped task's runs carry their group: its tokenizer, hence its teacher, is the group's.
            common = dict(suite=suite.name, task=task, pair=pair, training=suite.training, profiling=suite.profiling,
                          group=group if len(group) > 1 else [])
            for index in range(len(pair.teachers)) if pair.teachers else [None]:
                runs.append(RunSpec(kind="teacher", seed=suite.seeds[0], teacher_index=index, **common))
            for seed in suite.seeds:
                runs.append(RunSpec(kind="student", seed=seed, first_stage=first_stage_of(suite, pair, seed), **common))
                for m in (m for m in suite.methods if m.runs_on(task.name)):
                    runs.append(RunSpec(kind="distill", method=m, seed=seed, compression=suite.compression,
                                        first_stage=first_stage_of(suite, pair, seed),
                                        **{**common, "training": method_training(suite.training, m)}))
                for g in (g for g in suite.multitask if task.name in g.tasks):
                    method = next(m for m in suite.methods if m.name == g.method)
                    multitask.append(RunSpec(kind="multitask", seed=seed, compression=suite.compression,
                                             method=MethodSpec(name=g.name, method=method.method,
                                                               params=method.params, training=method.training),
                                             **{**common, "training": method_training(suite.training, method)}))
    runs.sort(key=lambda r: stage_depth(suite.pairs, r.pair))  # stable: first stages, then who starts from them
    return runs + multitask


def first_stage_spec(suite: Suite, pair: PairSpec, seed: int) -> RunSpec | None:
    """The distill run whose student `pair`'s student of `seed` starts from (`from_run`; as expand makes it), or
    None for a pair whose student starts from its own model."""
    wanted = pair.student.from_run
    if wanted is None:
        return None
    first = first_stage_pair(suite.pairs, pair)
    task = next(t for t in suite.tasks if t.name == wanted.task)
    method = next(m for m in suite.methods if m.name == wanted.method)
    group = group_of(suite, task.name)
    return RunSpec(suite=suite.name, kind="distill", task=task, pair=first, method=method, seed=seed,
                   training=method_training(suite.training, method), compression=suite.compression,
                   profiling=suite.profiling, group=group if len(group) > 1 else [],
                   first_stage=first_stage_of(suite, first, seed))


def first_stage_of(suite: Suite, pair: PairSpec, seed: int) -> str | None:
    """The spec hash of first_stage_spec, or None."""
    first = first_stage_spec(suite, pair, seed)
    return None if first is None else first.spec_hash


def group_of(suite: Suite, task_name: str) -> list[TaskSpec]:
    """The tasks that share a tokenizer with `task_name`: its multitask group, or itself alone."""
    for g in suite.multitask:
        if task_name in g.tasks:
            return [t for name in g.tasks for t in suite.tasks if t.name == name]
    return [t for t in suite.tasks if t.name == task_name]


def tokenizer_tasks(suite: Suite, task_name: str) -> list[TaskSpec]:
    """The tasks whose texts train `task_name`'s tokenizer: its multitask group, or the tasks that two-stage pairs
    link to it (kdbench.two_stage.linked_tasks: a first stage's model keeps its vocabulary), or itself alone."""
    linked = linked_tasks(suite, task_name)
    return [t for t in suite.tasks if t.name in linked] if len(linked) > 1 else group_of(suite, task_name)
