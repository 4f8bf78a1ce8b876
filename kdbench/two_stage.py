"""Two-stage distillation in a suite: a student that starts from another run's distilled student.

`student: {from_run: {pair: P, task: C, method: M}}` starts each seed's student from pair P's student distilled by
method M on task C with the same seed: general distillation on a masked-LM corpus, then task distillation
(TinyBERT), or DistilBERT's pre-trained student fine-tuned on a task. Here: the checks made when a suite loads, the
first-stage pair behind a pair, the tasks that share one tokenizer (the first stage's model keeps its vocabulary),
and the order of the pairs (a first stage before the pairs that start from it). It works on a Suite's objects and
imports none of kdbench's modules but errors; kdbench.run.first_stage trains and caches the first stages.
"""

from __future__ import annotations

from kdbench.errors import KdbenchError


def resolve_pairs(pairs: list) -> None:
    """Refuse a `from_run` that names an unknown pair or makes a cycle (a ValueError, for the suite's `pairs`
    validator), and give each two-stage student the model reference of the first student of its chain: its
    tokenizer and its family, as the model it starts from has them."""
    by_name = {p.name: p for p in pairs}
    for p in pairs:
        chain, root = [p.name], p
        while root.student.from_run is not None:
            name = root.student.from_run.pair
            if name not in by_name:
                raise ValueError(f"{root.name}.student.from_run.pair: unknown pair {name!r}; the suite's pairs: "
                                 + ", ".join(by_name))
            if name in chain:
                raise ValueError(f"from_run makes a cycle ({' -> '.join([*chain, name])}); a first stage needs a "
                                 "student of its own (`model` or `from_teacher`)")
            chain.append(name)
            root = by_name[name]
        if root is not p:
            ref = root.student.model
            p.student.model = ref.model_copy(deep=True) if hasattr(ref, "model_copy") else ref
            p.student.__pydantic_fields_set__.discard("model")  # set here, not given: the pair's validator allows it


def first_stage_pair(pairs: list, pair):
    """The pair whose distilled student `pair`'s students start from, or None."""
    if pair.student.from_run is None:
        return None
    return next(p for p in pairs if p.name == pair.student.from_run.pair)


def stage_depth(pairs: list, pair) -> int:
    """0 for a pair whose student starts from its own model; 1 + its first stage's depth for a two-stage one."""
    first = first_stage_pair(pairs, pair)
    return 0 if first is None else 1 + stage_depth(pairs, first)


def in_stage_order(pairs: list) -> list:
    """The pairs, first stages before the pairs that start from them (else in the suite's order)."""
    return sorted(pairs, key=lambda p: stage_depth(pairs, p))


def linked_tasks(suite, task_name: str) -> list[str]:
    """The names of the tasks whose texts train one tokenizer with `task_name`'s, in the suite's order: those that
    two-stage pairs link (a pair's tasks and its first stage's task), transitively; [task_name] when none does."""
    edges = [(t.name, p.student.from_run.task) for p in suite.pairs if p.student.from_run is not None
             for t in suite.tasks if p.runs_on(t.name)]
    linked, grown = {task_name}, True
    while grown:
        more = {b for a, b in edges if a in linked} | {a for a, b in edges if b in linked}
        grown = not more <= linked
        linked |= more
    return [t.name for t in suite.tasks if t.name in linked]


def check_first_stages(suite) -> None:
    """Refuse, in one line with the key path (`loc`), a `from_run` whose task or method is unknown, that names a
    task its own pair runs on, whose first stage does not exist (its pair or method does not run on that task), or
    that is in a multitask suite."""
    tasks, methods = [t.name for t in suite.tasks], {m.name: m for m in suite.methods}
    for i, p in enumerate(suite.pairs):
        wanted = p.student.from_run
        if wanted is None:
            continue
        loc = ("pairs", i, "student", "from_run")
        if suite.multitask:
            raise _at(loc, "a multitask suite builds its students from their own model; from_run is for "
                      "single-task students")
        if wanted.task not in tasks:
            raise _at((*loc, "task"), f"unknown task {wanted.task!r}; the suite's tasks: " + ", ".join(tasks))
        if wanted.method not in methods:
            raise _at((*loc, "method"), f"unknown method {wanted.method!r}; the suite's methods: "
                      + (", ".join(methods) or "none"))
        if p.runs_on(wanted.task):
            raise _at((*loc, "task"), f"pair {p.name!r} runs on {wanted.task!r}, the task its students start from; "
                      "list the tasks it runs on without it (`tasks: [...]`)")
        first = first_stage_pair(suite.pairs, p)
        if not first.runs_on(wanted.task):
            raise _at((*loc, "pair"), f"pair {first.name!r} does not run on task {wanted.task!r}, so there is no "
                      "first stage to start from")
        if not methods[wanted.method].runs_on(wanted.task):
            raise _at((*loc, "method"), f"method {wanted.method!r} does not run on task {wanted.task!r} (its "
                      f"tasks: {', '.join(methods[wanted.method].tasks)}), so there is no first stage to start from")


def _at(loc: tuple, message: str) -> KdbenchError:
    e = KdbenchError(message)
    e.loc = loc
    return e
