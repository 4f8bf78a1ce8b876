"""`kdbench run SUITE --ray`: the runner's plan as a DAG of Ray jobs (kdbench.run.ray_cluster).

Each pending run becomes a job that runs the runner's own `execute` on a worker, against that node's cache
(node_cache) and a private results folder holding the results it reads (its teachers'). Dependencies: a (task,
pair)'s teacher before its students; the student alone before the methods that start from it; every teacher of a
multitask group before the group's runs, and the group's first run (which trains the shared student) before the
others; a first stage before the two-stage students that start from it; the first run of a cached teacher's top-k
tokens before the others that read them. The caches those runs leave (tokenizer, fine-tuned teacher, student
alone, multi-task student, first stage, sparse teacher) travel to the nodes that need them; caches already in the driver's cache_dir are seeded from there. The driver alone writes
the result JSONs and the report; each result also records the node, its GPUs and the attempts (`node`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from kdbench.results import read_result, run_path, write_result
from kdbench.run.context import Context, for_task, teacher_run_ids
from kdbench.plan import RunSpec, first_stage_spec
from kdbench.suite import Suite

log = logging.getLogger(__name__)


def default_gpus() -> float:
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def run_on_node(cache: Path, suite: Suite, spec: RunSpec, known: dict[str, dict], *, deps: dict) -> dict:
    """A worker's part: `spec`'s RunResult, made with this node's cache; `known` and `deps` hold the results
    its run reads (by run id, and by job id)."""
    from kdbench.run.runner import execute, resolve_device

    here = suite.model_copy(update={"cache_dir": str(cache)})
    with tempfile.TemporaryDirectory(prefix="kdbench-results-") as tmp:
        for result in [*known.values(), *deps.values()]:
            write_result(run_path(Path(tmp), result["run_id"]), result)
        return execute(spec, Context(here, Path(tmp), resolve_device(suite.device)))


def plan_jobs(suite: Suite, specs: list[RunSpec], pending: set[str], ctx: Context) -> tuple[list, dict]:
    """(jobs for the pending runs, seeds {cache path: driver folder}) ; `ctx` is the driver's (for cache keys)."""
    from kdbench.run.first_stage import first_stage_folder, is_first_stage
    from kdbench.run.group import group_key
    from kdbench.run.prepare import sparse_teacher_folder
    from kdbench.run.ray_cluster import Job

    gpus = suite.resources.gpus_per_run if suite.resources.gpus_per_run is not None else default_gpus()
    keep_alone = any(m.start_from == "student" for m in suite.methods)
    cache = Path(suite.cache_dir)
    seeds: dict[str, Path] = {}
    jobs, first_of_group, first_of_cache = [], {}, {}

    def cached(rel: str) -> str:
        if (cache / rel).exists():
            seeds[rel] = cache / rel
        return rel

    def teacher_needs(s: RunSpec) -> tuple[str, ...]:
        several = s.pair.teachers is not None and s.teacher_index is None  # a student of several teachers
        indices = range(len(s.pair.teachers)) if several else [None]
        return (cached(f"tokenizers/{ctx.tokenizer_key(s)}"),
                *(cached(f"teachers/{ctx.teacher_key(s, i)}") for i in indices))

    for spec in specs:
        if spec.run_id not in pending:
            continue
        views = [for_task(spec, t) for t in spec.group] if spec.kind == "multitask" else [spec]
        deps, needs, produces, known = [], [], (), {}
        for v in views if spec.kind != "teacher" else []:
            for tid in teacher_run_ids(v):
                if tid in pending:
                    deps.append(tid)
                else:
                    known[tid] = read_result(run_path(ctx.results_dir, tid)) or {"run_id": tid, "status": "missing"}
            needs += teacher_needs(v)
        if spec.kind == "teacher":
            produces = teacher_needs(spec)
        alone = f"students/{ctx.student_alone_key(spec)}" if spec.kind in ("student", "distill") else None
        if spec.kind == "student" and keep_alone:
            produces = (alone,)
        if spec.kind == "distill" and spec.method.start_from == "student":
            sid = spec.model_copy(update={"kind": "student", "method": None}).run_id
            deps += [sid] if sid in pending else []
            needs.append(cached(alone))
        if spec.kind == "distill" and is_first_stage(spec, ctx):  # its distilled student, for a two-stage pair
            produces = (f"first_stage/{first_stage_folder(spec, ctx).name}",)
        stage1 = first_stage_spec(suite, spec.pair, spec.seed) if spec.kind in ("student", "distill") else None
        if stage1 is not None:  # a two-stage student starts from its first stage's distilled student
            deps += [stage1.run_id] if stage1.run_id in pending else []
            needs.append(cached(f"first_stage/{first_stage_folder(stage1, ctx).name}"))
        sparse = sparse_teacher_of(spec)
        if sparse is not None:  # the teacher's top-k (or drawn) tokens: made by the first run that asks, then moved
            rel = f"sparse_teacher/{sparse_teacher_folder(spec, ctx, sparse).name}"
            first = first_of_cache.setdefault(rel, spec.run_id)
            if first == spec.run_id:
                produces = (*produces, rel)
            else:
                deps.append(first)
            needs.append(cached(rel))
        if spec.kind == "multitask":
            rel = f"multitask/{group_key(spec, ctx)}"
            first = first_of_group.setdefault(rel, spec.run_id)
            if first == spec.run_id:
                produces = (rel,)
            else:
                deps.append(first)
            needs.append(cached(rel))
        res = spec.method.resources if spec.method is not None and spec.method.resources else suite.resources
        job_gpus = res.gpus_per_run if res.gpus_per_run is not None else gpus
        known = {k: v for k, v in known.items() if v.get("status") != "missing"}
        jobs.append(Job(spec.run_id, run_on_node, (suite, spec, known), deps=tuple(deps), produces=produces,
                        needs=tuple(n for n in needs if n in seeds), num_cpus=res.cpus_per_run, num_gpus=job_gpus,
                        max_retries=suite.max_retries, pass_deps=True))
    return jobs, seeds


def sparse_teacher_of(spec: RunSpec):
    """The SparseTeacher a distilled run's objective trains from (its teacher's cached top-k tokens), else None."""
    if spec.kind != "distill":
        return None
    from kdbench.methods import make_objective

    return make_objective(spec.method.method, spec.method.params).sparse_teacher


def failed_result(spec: RunSpec, ctx: Context, reason: str, kind: str) -> dict:
    """The RunResult of a run that no worker finished (its worker died past its retries, or it was not run); its
    versions and device are the driver's, as no worker reported its own."""
    from kdbench.results import device_info, versions

    return {"run_id": spec.run_id, "spec": spec.model_dump(mode="json"), "spec_hash": spec.spec_hash,
            "data_key": ctx.data_key(spec), "versions": versions(), "device": device_info("cpu"),
            "status": "failed", "error": reason, "error_kind": kind, "variants": []}


def node_record(outcome) -> dict | None:
    if outcome.node is None:
        return None
    keep = ("node_id", "ip", "hostname", "gpus")
    return {"engine": "ray", **{k: outcome.node[k] for k in keep}, "attempts": outcome.attempts}


def run_suite_on_ray(suite: Suite, results_dir=None, *, address: str | None = None, storage: str | None = None,
                     rerun: bool = False, only: list[str] | None = None, show_progress: bool = True):
    """As kdbench.run.runner.run_suite, with the runs spread over a Ray cluster (`address`: None starts a local
    Ray, "auto" joins a running one, "ray://host:port" goes through Ray Client). Returns a SuiteOutcome."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kdbench import report
    from kdbench.run import ray_cluster
    from kdbench.run.runner import RunOutcome, SuiteOutcome, finished, keep_finished, results_dir_for
    from kdbench.plan import expand

    out = results_dir_for(suite, results_dir)
    specs = [s for s in expand(suite) if only is None or s.run_id in only]
    by_id = {s.run_id: s for s in specs}
    ctx = Context(suite, out, "cpu")  # the driver's: cache keys and the data key, no model
    pending = {s.run_id for s in specs if rerun or not finished(out, s, ctx)}
    jobs, seeds = plan_jobs(suite, specs, pending, ctx)
    outcome = SuiteOutcome(out)
    outcome.runs += [RunOutcome(s.run_id, "skipped") for s in specs if s.run_id not in pending]
    ray_cluster.init_ray(address)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), disable=not show_progress)
    runs_task = bar.add_task(f"suite {suite.name} on Ray", total=len(jobs))

    def on_result(o) -> None:  # the driver alone writes, as each result arrives: a dead driver loses no run
        spec = by_id[o.id]
        if o.status == "ok":
            result = o.value
        else:
            result = failed_result(spec, ctx, o.reason, "input" if o.reason.startswith("not run") else "worker")
        result = {**result, "node": node_record(o)}
        write_result(keep_finished(run_path(out, o.id), result), result)
        outcome.runs.append(RunOutcome(o.id, result["status"], result.get("error"), result.get("error_kind"),
                                       result.get("failed_variants", [])))
        bar.advance(runs_task)

    def on_progress(p) -> None:
        where = ", ".join(f"{j} @ {n}" for j, n in sorted(p.running.items()))
        bar.update(runs_task, description=f"suite {suite.name}: {p.done} ok, {p.failed} failed, "
                   f"{len(p.running)} running, {p.queued} queued" + (f" [{where}]" if where else ""))

    with bar:
        ray_cluster.run_jobs(jobs, storage=storage, seeds=seeds, on_result=on_result, on_progress=on_progress)
    report.write_report(out, suite_name=suite.name)
    order = {s.run_id: i for i, s in enumerate(specs)}
    outcome.runs.sort(key=lambda r: order[r.run_id])
    return outcome
