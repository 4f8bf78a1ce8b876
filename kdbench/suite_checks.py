"""The checks a parsed suite passes before anything runs: every registry key and its params, the references between
its sections (tasks, pairs, methods, multitask groups), and each method's changes to `training`.

A failure is a KdbenchError carrying `loc`, the key path in the suite; kdbench.suite.load_suite adds the file and line.
"""

from __future__ import annotations

from pydantic import ValidationError

from kdbench import two_stage
from kdbench.errors import KdbenchError
from kdbench.suite import MethodSpec, Suite, TrainingSettings, _message
from kdbench.yamlfile import first_non_finite


def check_registry_names(suite: Suite) -> None:
    """Resolve every registry key and validate its params, so a typo fails before any training starts.

    A failure carries `loc`, the key path in the suite, when it has one.
    """
    from kdbench.compress import compressors
    from kdbench.methods import methods
    from kdbench.models import check_model_ref
    from kdbench.tasks import tasks

    def check(loc: tuple, validate, *args):
        try:
            checked = validate(*args)
        except KdbenchError as e:
            e.loc = (*loc, *getattr(e, "loc", ()))
            raise
        return checked

    def check_params(loc: tuple, registry, name: str, params: dict):
        # a string such as "inf" passes a params schema's float field unless the schema forbids it: refuse it here
        bad = first_non_finite(check(loc, registry.validate_params, name, params))
        if bad is not None:
            raise _at((*loc, "params", *bad[0]), f"must be a finite number, got {bad[1]}")

    for i, t in enumerate(suite.tasks):
        check_params(("tasks", i), tasks, t.task, t.params)
    for i, m in enumerate(suite.methods):
        check_params(("methods", i), methods, m.method, m.params)
        check(("methods", i, "training"), method_training, suite.training, m)
    for i, c in enumerate(suite.compression):
        for j, step in enumerate(c.steps):
            check_params(("compression", i, "steps", j), compressors, step.compressor, step.params)
    for i, p in enumerate(suite.pairs):
        for role, spec in [*p.teacher_roles, ("student", p.student)]:
            where = tuple(int(x) if x.isdigit() else x for x in role.split("."))  # "teachers.1": a list index
            check(("pairs", i, *where, "model"), check_model_ref, spec.model, f"pairs.{p.name}.{role}")
        if p.teachers is not None:
            check_several_teachers(suite, i)
        if p.student.from_teacher is not None:
            from kdbench.student_init import check_selection

            check(("pairs", i, "student", "from_teacher"), check_selection, p.teacher.model, p.student.from_teacher)
            if suite.multitask:
                raise _at(("pairs", i, "student", "from_teacher"), "a multitask suite builds its students from "
                          "their own model; from_teacher is for single-task students")
    two_stage.check_first_stages(suite)  # from_run: its task, method and first stage
    task_names, method_names = [t.name for t in suite.tasks], [m.name for m in suite.methods]
    for i, p in enumerate(suite.pairs):
        for j, name in enumerate(p.tasks or []):
            if name not in task_names:
                raise _at(("pairs", i, "tasks", j), f"unknown task {name!r}; the suite's tasks: " + ", ".join(task_names))
    for i, m in enumerate(suite.methods):
        for j, name in enumerate(m.tasks or []):
            if name not in task_names:
                raise _at(("methods", i, "tasks", j), f"unknown task {name!r}; the suite's tasks: "
                          + ", ".join(task_names))
    for i, group in enumerate(suite.multitask):
        for j, name in enumerate(group.tasks):
            if name not in task_names:
                raise _at(("multitask", i, "tasks", j), f"unknown task {name!r}; the suite's tasks: "
                          + ", ".join(task_names))
        if len(set(group.tasks)) != len(group.tasks):
            raise _at(("multitask", i, "tasks"), "a task is listed twice")
        if group.name in method_names:
            raise _at(("multitask", i, "name"), f"{group.name!r} is also a method's name; rows need distinct names")
        if group.method not in method_names:
            raise _at(("multitask", i, "method"), f"unknown method {group.method!r}; the suite's methods: "
                      + (", ".join(method_names) or "none"))
        if suite.methods[method_names.index(group.method)].start_from != "init":
            raise _at(("multitask", i, "method"), f"method {group.method!r} starts from the student alone; a "
                      "multi-task student starts from its initialisation")
        params = suite.methods[method_names.index(group.method)].params
        if any(params.get(key) is not None for key in ("teacher_top_k", "teacher_samples")):
            raise _at(("multitask", i, "method"), f"method {group.method!r} caches its teacher's top-k tokens; a "
                      "multi-task student runs every task's teacher at each step")
        for p in suite.pairs:  # a pair trains the group's student on all of the group's tasks, or on none
            served = [name for name in group.tasks if p.runs_on(name)]
            if served and len(served) < len(group.tasks):
                missing = next(name for name in group.tasks if not p.runs_on(name))
                raise _at(("multitask", i, "tasks"), f"pair {p.name!r} runs on {served[0]!r} but not on {missing!r}; "
                          "a pair serves all of a multitask group's tasks or none")
    groups = [t for g in suite.multitask for t in g.tasks]
    shared = sorted({t for t in groups if groups.count(t) > 1})
    if shared:
        # The tasks of a group share one tokenizer (the student has one vocabulary), so their teachers do too.
        raise _at(("multitask",), f"task {shared[0]!r} is in two multitask groups; a task may be in one only")


def check_several_teachers(suite: Suite, i: int) -> None:
    """A pair with `teachers` distils through their ensemble, which has soft targets only: refuse the methods of its
    tasks that need one teacher's hidden states, attention maps, output layer or decoding (asked of the objective)."""
    from kdbench.methods import make_objective

    pair = suite.pairs[i]
    grouped = {g.method for g in suite.multitask if any(pair.runs_on(t) for t in g.tasks)}
    for j, m in enumerate(suite.methods):
        if not (m.name in grouped or any(pair.runs_on(t.name) and m.runs_on(t.name) for t in suite.tasks)):
            continue
        objective = make_objective(m.method, m.params)
        needs = ("hidden states" if objective.needs_hidden_states else "attention maps" if objective.needs_attentions
                 else "output layer (fused_linear)" if objective.fused_linear
                 else "decoding" if objective.teacher_decoding is not None else None)
        if needs is not None:
            raise _at(("methods", j), f"method {m.name!r} needs one teacher's {needs}; pair {pair.name!r} has "
                      f"{len(pair.teachers)} teachers, whose ensemble gives soft targets only")


def method_training(training: TrainingSettings, method: MethodSpec) -> TrainingSettings:
    """The suite's training settings with the method's own changes. The sequence length stays the suite's: every
    model of a suite sees the same encoded rows."""
    if "max_seq_length" in method.training:
        raise _at(("max_seq_length",), "is the suite's (training.max_seq_length), the same for every method")
    try:
        return TrainingSettings(**{**training.model_dump(), **method.training})
    except ValidationError as e:
        err = e.errors()[0]
        raise _at(tuple(err["loc"]), _message(err)) from None


def _at(loc: tuple, message: str) -> KdbenchError:
    e = KdbenchError(message)
    e.loc = loc
    return e
