"""A suite expanded into runs: one RunSpec per (task, pair, role, seed), whose hash keys its result and caches."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kdbench.suite import (CompressionSpec, MethodSpec, PairSpec, ProfilingSettings, Suite, TaskSpec,
                           TrainingSettings, method_training)

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
    training: TrainingSettings
    compression: list[CompressionSpec] = Field(default_factory=list)
    profiling: ProfilingSettings

    @property
    def run_id(self) -> str:
        role = {"teacher": "teacher", "student": "student"}.get(self.kind) or self.method.name
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
            runs.append(RunSpec(kind="teacher", seed=suite.seeds[0], **common))
            for seed in suite.seeds:
                runs.append(RunSpec(kind="student", seed=seed, **common))
                for m in (m for m in suite.methods if m.runs_on(task.name)):
                    runs.append(RunSpec(kind="distill", method=m, seed=seed, compression=suite.compression,
                                        **{**common, "training": method_training(suite.training, m)}))
                for g in (g for g in suite.multitask if task.name in g.tasks):
                    method = next(m for m in suite.methods if m.name == g.method)
                    multitask.append(RunSpec(kind="multitask", seed=seed, compression=suite.compression,
                                             method=MethodSpec(name=g.name, method=method.method,
                                                               params=method.params, training=method.training),
                                             **{**common, "training": method_training(suite.training, method)}))
    return runs + multitask


def group_of(suite: Suite, task_name: str) -> list[TaskSpec]:
    """The tasks that share a tokenizer with `task_name`: its multitask group, or itself alone."""
    for g in suite.multitask:
        if task_name in g.tasks:
            return [t for name in g.tasks for t in suite.tasks if t.name == name]
    return [t for t in suite.tasks if t.name == task_name]
