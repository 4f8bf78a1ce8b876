"""Preflight: every check of a suite that needs no training, so that bad input is refused before any work.

`kdbench validate` runs it after loading each suite, and `kdbench run` before its first run starts. Loading
(kdbench.suite) has already checked the schema, the registry names and every params; this adds what needs the
files: the data (files, columns, labels), the inline model configs and vocabularies, and, for a run, the folders
it writes (inside their base, writable). Each problem is one KdbenchError naming the culprit.
"""

from __future__ import annotations

from pathlib import Path

from kdbench.errors import KdbenchError
from kdbench.preflight import data_files, folders, model_configs
from kdbench.plan import expand, tokenizer_tasks
from kdbench.suite import Suite


def check_suite(suite: Suite, *, results_base: Path | None = None, results_dir: Path | None = None,
                writable: bool = False) -> None:
    """Check `suite` without training. With `results_dir` (the suite's folder under `results_base`), check where
    its results go; with `writable`, also that the results and cache folders can be written (this makes them)."""
    if results_dir is not None:
        folders.check_inside(Path(results_base or Path(results_dir).parent), Path(results_dir),
                             [s.run_id for s in expand(suite)])
    for task in suite.tasks:
        check_task_data(task)
    check_models(suite)
    if results_dir is not None and writable:  # last: a suite refused above leaves no folder behind
        folders.check_folders(Path(results_dir), Path(suite.cache_dir))


def check_task_data(task) -> None:
    """A local-file task's files exist and have their columns; a classifier's labels agree across the splits."""
    from kdbench.tasks import tasks

    cls = tasks.get(task.task)
    path_params = getattr(cls, "path_params", ())
    if not path_params:
        return  # generated data, or a hub dataset (which needs a network: left to the run)
    params = tasks.validate_params(task.task, task.params)
    fmt = getattr(params, "format", "auto")
    try:
        data_files.check_files(params, path_params, fmt)
        fields = type(params).model_fields
        if {"label_column", "labels", "train_file", "eval_file"} <= set(fields):
            data_files.check_labels(params.train_file, params.eval_file, fmt, params.label_column, params.labels)
    except KdbenchError as e:
        raise KdbenchError(f"tasks.{task.name}: {e}") from None


def _texts(suite: Suite, task_name: str) -> list[str]:
    """The texts a pair of inline models trains its tokenizer on: the task's (or its multitask group's, or its
    two-stage tasks') train split, as the task's head gives them (kdbench.heads.Head.texts)."""
    from kdbench import heads
    from kdbench.tasks import load_task

    texts = []
    for t in tokenizer_tasks(suite, task_name):
        data = load_task(t.task, t.params)
        texts += heads.get(data.head, **data.head_params).texts(data.train)
    return texts


def _needs_network(suite: Suite, task_name: str) -> bool:
    from kdbench.tasks import tasks

    # kdbench.tasks.HubTask families name their local-file twin; their data comes from the hub
    return any(hasattr(tasks.get(t.task), "local_task") for t in tokenizer_tasks(suite, task_name))


def check_models(suite: Suite) -> None:
    """Each pair's inline configs build and construct, and its vocabularies agree (see model_configs)."""
    for pair in suite.pairs:
        where = f"pairs.{pair.name}"
        roles = [(role, t.model) for role, t in pair.teacher_roles]
        # a list for several teachers, as kdbench.models.pair_tokenizer takes them
        t_ref, s_ref = roles[0][1] if pair.teachers is None else [ref for _, ref in roles], pair.student.model
        refs = [ref for _, ref in roles] + [s_ref]
        model_configs.check_label_sets(roles, where)
        if any(isinstance(r, str) for r in refs):
            sizes = [model_configs.tokenizer_size(t_ref, s_ref, None, where)]
        elif any(model_configs.explicit_vocab(r) is not None for r in refs):
            # two inline models with a vocab_size of their own: their tokenizer is trained on each task's texts,
            # which are read here unless they come from the hub
            served = [t.name for t in suite.tasks if pair.runs_on(t.name) and not _needs_network(suite, t.name)]
            sizes = [model_configs.tokenizer_size(t_ref, s_ref, _texts(suite, name), where) for name in served]
        else:
            sizes = []
        for size in sizes or [None]:
            model_configs.check_vocabularies(t_ref, s_ref, size, where)
        for role, ref in [*roles, ("student", s_ref)]:
            if not isinstance(ref, str):
                model_configs.check_inline(ref, f"{where}.{role}.model")
