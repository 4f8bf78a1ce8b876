"""Runs a DAG of jobs as Ray tasks over a cluster, with no shared file system assumed.

The driver submits a job once every job it depends on has finished; Ray places it where its resources are free.
On its worker the job first finds, in that node's cache (node_cache), the artifacts its dependencies made, fetched
from the object store or a storage URL only when the node lacks them; then it runs `fn(cache_dir, *args)`, and
packs what it `produces` for the jobs after it. Only the job's return value comes back to the driver, which alone
writes anything the caller keeps (through `on_result`).

Faults: a worker that dies (killed process, lost node) has its job retried by Ray up to `max_retries` times; an
error raised by the job itself comes back as its failure and is not retried. Either way, once a job has failed, the jobs
that depend on it fail as not run, and the others go on. Ctrl-C cancels every outstanding task and re-raises.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import RayError, RayTaskError

from kdbench.run import node_cache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One unit of work. `fn` must be picklable (a module-level function); it is called as `fn(cache_dir, *args)`
    on a worker, `cache_dir` being that node's cache, where the artifacts of `deps` (and `needs`) already lie."""

    id: str
    fn: Callable[..., Any]
    args: tuple = ()
    deps: tuple[str, ...] = ()  # jobs that finish first; what they produce is placed on this job's node
    produces: tuple[str, ...] = ()  # paths under the node cache that this job leaves for its dependants
    needs: tuple[str, ...] = ()  # paths the driver seeds (run_jobs(seeds=...)), e.g. made by an earlier session
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources, e.g. to pin a node
    max_retries: int = 2  # re-runs after the worker dies; an error raised by `fn` is never retried
    pass_deps: bool = False  # call fn(cache_dir, *args, deps={dep id: its return value})


@dataclass
class JobOutcome:
    id: str
    status: str  # "ok" | "failed" | "cancelled"
    value: Any = None  # what fn returned
    reason: str | None = None  # why it failed, in one line
    traceback: str | None = None  # for an error raised by fn
    attempts: int = 0  # how many times a worker started it
    node: dict | None = None  # the last attempt's node: node_id, ip, hostname, pid, gpus
    transfers: list[dict] = field(default_factory=list)  # node_cache.Transfer of each artifact placed or packed
    submitted_at: float | None = None  # time.time() on the driver
    started_at: float | None = None  # time.time() on the worker (same clock only on one machine)
    ended_at: float | None = None  # time.time() on the worker, artifacts packed
    finished_at: float | None = None  # time.time() on the driver, when the result arrived
    fn_s: float | None = None  # seconds inside fn


@dataclass
class Progress:
    total: int
    done: int  # finished ok
    failed: int
    running: dict[str, str]  # job id -> node label (ip:node-id prefix), for the jobs a worker has started
    queued: int  # submitted, waiting for resources


def init_ray(address: str | None = None, **kwargs) -> None:
    """Connect this process to Ray: a new local instance (None), a running cluster ("auto", "host:port") or Ray
    Client ("ray://host:10001"). Already connected: nothing happens."""
    if ray.is_initialized():
        return
    kwargs.setdefault("log_to_driver", True)
    ray.init(address=address, **kwargs)


def node_label(info: dict | None) -> str:
    return "?" if not info else f"{info['ip']}:{info['node_id'][:8]}"


# ---------------------------------------------------------------------------------------------------------------
# The worker side


@ray.remote(num_cpus=0)
class _Board:
    """Where workers say that they started a job: the driver's view of what runs where, and of retries."""

    def __init__(self):
        self.starts: dict[str, list[dict]] = {}

    def started(self, job_id: str, info: dict) -> None:
        self.starts.setdefault(job_id, []).append(info)

    def snapshot(self) -> dict[str, list[dict]]:
        return self.starts


def _node_info() -> dict:
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
            "pid": os.getpid(), "gpus": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]}


def _execute(job_id: str, fn, args: tuple, kwargs: dict, inputs: dict[str, list], produces: tuple[str, ...],
             storage, board):
    """The task body: place the inputs, run fn, pack the outputs. Returns (report, *packed artifacts)."""
    info = _node_info()
    try:  # waited on: a message still in flight when the worker dies would leave its attempt uncounted
        ray.get(board.started.remote(job_id, info), timeout=30)
    except RayError:
        log.warning("progress board unreachable; %s runs unreported", job_id)
    started_at = time.time()
    cache = node_cache.node_cache_dir()
    # a ref nested in a list is not fetched by Ray before the task starts: only a node that lacks it fetches it
    transfers = [node_cache.place(cache, rel, lambda r=refs[0]: ray.get(r)) for rel, refs in inputs.items()]
    report = {"node": info, "started_at": started_at}
    t0 = time.perf_counter()
    try:
        report["value"] = fn(cache, *args, **kwargs)
    except Exception as e:  # the job's own failure: reported as a result, so Ray never retries it
        report["error"], report["traceback"] = f"{type(e).__name__}: {e}", traceback.format_exc()
    report["fn_s"] = time.perf_counter() - t0
    packed = [] if "error" in report else [node_cache.pack(cache, rel, storage) for rel in produces]
    report["transfers"] = [vars(t) for t in transfers + [t for _, t in packed]]
    report["ended_at"] = time.time()
    artifacts = [p for p, _ in packed] or [None] * len(produces)
    return (report, *artifacts) if produces else report


_execute_remote = ray.remote(_execute)


# ---------------------------------------------------------------------------------------------------------------
# The driver side


def _order(jobs: list[Job]) -> list[Job]:
    """`jobs` in an order where every job follows its deps; refuses unknown deps, duplicate ids and cycles."""
    by_id: dict[str, Job] = {}
    for j in jobs:
        if j.id in by_id:
            raise ValueError(f"job {j.id!r} is listed twice")
        by_id[j.id] = j
    for j in jobs:
        for d in j.deps:
            if d not in by_id:
                raise ValueError(f"job {j.id!r} depends on unknown job {d!r}")
    order, state = [], {}

    def visit(j: Job, path: tuple[str, ...]):
        if state.get(j.id) == "done":
            return
        if state.get(j.id) == "visiting":
            raise ValueError(f"jobs depend on each other in a cycle: {' -> '.join(path + (j.id,))}")
        state[j.id] = "visiting"
        for d in j.deps:
            visit(by_id[d], path + (j.id,))
        state[j.id] = "done"
        order.append(j)

    for j in jobs:
        visit(j, ())
    return order


def _infeasible(job: Job, nodes: list[dict]) -> str | None:
    """Why no live node could ever run `job`, or None. (An autoscaling cluster: pass check_resources=False.)"""
    need = {"CPU": job.num_cpus, "GPU": job.num_gpus, **job.resources}
    need = {k: v for k, v in need.items() if v}
    for n in nodes:
        if all(n.get("Resources", {}).get(k, 0) >= v for k, v in need.items()):
            return None
    have = ", ".join(f"{k}={max((n.get('Resources', {}).get(k, 0) for n in nodes), default=0):g}" for k in need)
    wants = ", ".join(f"{k}={v:g}" for k, v in need.items())
    return f"no node of the cluster can run it: it needs {wants}; the largest node has {have}"


def _failure(e: RayError, attempts: int) -> tuple[str, str | None]:
    """(one-line reason, traceback or None) for a job whose result raised `e`."""
    if isinstance(e, RayTaskError):  # placing or packing an artifact raised (fn's own errors come as reports)
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
        return (f"{type(cause).__name__}: {cause}".splitlines() or [""])[0], str(e)
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__} after {attempts} attempt(s): {first}", None


def run_jobs(jobs: list[Job], *, storage: str | None = None, seeds: dict[str, Any] | None = None,
             on_result: Callable[[JobOutcome], None] | None = None,
             on_progress: Callable[[Progress], None] | None = None,
             check_resources: bool = True, poll_s: float = 0.5) -> dict[str, JobOutcome]:
    """Run `jobs` on the connected Ray cluster (init_ray first) and return every job's outcome by id.

    storage: an fsspec URL where artifacts go instead of the object store (the object store holds them only while
        this call runs; a storage URL keeps them for later sessions, and spares the driver's node their bytes).
    seeds: {path under the node cache: a local file or folder on the driver} for jobs' `needs`.
    on_result: called on the driver with each outcome as it is known (write it down there: the driver may die).
    on_progress: called whenever the counts or the placement of running jobs change.
    """
    order = _order(jobs)
    by_id = {j.id: j for j in order}
    sources: dict[str, Any] = {rel: ray.put(node_cache.pack_local(p)) for rel, p in (seeds or {}).items()}
    nodes = [n for n in ray.nodes() if n.get("Alive")] if check_resources else []
    board = _Board.remote()
    outcomes: dict[str, JobOutcome] = {}
    waiting = list(order)
    inflight: dict[Any, tuple[Job, list, JobOutcome]] = {}
    starts: dict[str, list[dict]] = {}
    last_progress = None

    def finish(outcome: JobOutcome) -> None:
        outcome.finished_at = time.time()
        outcomes[outcome.id] = outcome
        if on_result is not None:
            on_result(outcome)

    def submit(job: Job) -> None:
        inputs = {rel: [sources[rel]] for d in job.deps for rel in by_id[d].produces if rel in sources}
        inputs.update({rel: [sources[rel]] for rel in job.needs if rel in sources})
        task = _execute_remote.options(
            num_cpus=job.num_cpus, num_gpus=job.num_gpus, resources=job.resources or None,
            max_retries=job.max_retries, retry_exceptions=False, num_returns=1 + len(job.produces),
            name=f"kdbench:{job.id}")
        kwargs = {"deps": {d: outcomes[d].value for d in job.deps}} if job.pass_deps else {}
        refs = task.remote(job.id, job.fn, job.args, kwargs, inputs, job.produces, storage, board)
        refs = refs if job.produces else [refs]
        inflight[refs[0]] = (job, refs[1:], JobOutcome(job.id, "running", submitted_at=time.time()))

    def collect(ref) -> None:
        job, artifact_refs, outcome = inflight.pop(ref)
        outcome.attempts = max(len(starts.get(job.id, [])), 1)
        try:
            report = ray.get(ref)
        except RayError as e:
            outcome.status = "failed"
            outcome.reason, outcome.traceback = _failure(e, outcome.attempts)
            outcome.node = (starts.get(job.id) or [None])[-1]
        else:
            outcome.node, outcome.started_at = report["node"], report["started_at"]
            outcome.fn_s, outcome.ended_at = report["fn_s"], report["ended_at"]
            outcome.transfers = report["transfers"]
            if "error" in report:
                outcome.status, outcome.traceback = "failed", report["traceback"]
                outcome.reason = (report["error"].splitlines() or [""])[0]
            else:
                outcome.status, outcome.value = "ok", report["value"]
                sources.update(zip(job.produces, artifact_refs))  # the driver never pulls an artifact's bytes
        if outcome.status == "failed":
            log.warning("job %s failed: %s", job.id, outcome.reason)
        finish(outcome)

    def report_progress() -> None:
        nonlocal last_progress, starts
        try:
            starts = ray.get(board.snapshot.remote())
        except RayError:
            pass  # the board is a convenience: the results still arrive
        running = {j.id: node_label(starts[j.id][-1]) for j, _, _ in inflight.values() if starts.get(j.id)}
        now = Progress(len(order), sum(o.status == "ok" for o in outcomes.values()),
                       sum(o.status == "failed" for o in outcomes.values()), running, len(inflight) - len(running))
        if on_progress is not None and now != last_progress:
            on_progress(now)
        last_progress = now

    try:
        while waiting or inflight:
            for job in list(waiting):
                bad = next((d for d in job.deps if d in outcomes and outcomes[d].status != "ok"), None)
                why = _infeasible(job, nodes) if nodes else None
                if bad is not None or why is not None:
                    waiting.remove(job)
                    reason = f"not run: {why}" if why else f"not run: job {bad!r} it depends on {outcomes[bad].status}"
                    finish(JobOutcome(job.id, "failed", reason=reason))
                elif all(d in outcomes for d in job.deps):
                    waiting.remove(job)
                    submit(job)
            if not inflight:
                continue  # what is left waits on jobs that were just failed as not run
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=poll_s)
            if done:  # and every other one that is ready by now
                done, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0)
            report_progress()  # before collecting, so a job's node and attempts are known when it ends
            for ref in done:
                collect(ref)
            if done:
                report_progress()
    except BaseException:  # Ctrl-C (KeyboardInterrupt, or the CLI's Interrupted), or a callback that raised
        log.warning("interrupted: cancelling %d outstanding job(s)", len(inflight) + len(waiting))
        for ref, (job, _, outcome) in list(inflight.items()):
            ray.cancel(ref, force=True)  # kills the worker process: training loops do not poll for cancellation
            outcome.status, outcome.reason = "cancelled", "interrupted"
            finish(outcome)
        for job in waiting:
            finish(JobOutcome(job.id, "cancelled", reason="interrupted before it started"))
        inflight.clear()
        raise
    finally:
        try:
            ray.kill(board)
        except RayError:
            pass
    return outcomes
