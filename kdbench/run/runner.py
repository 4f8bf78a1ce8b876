"""The suite loop: executes a suite's runs in order, caching what it can and recording every outcome.

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

import logging
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from kdbench import distributed
from kdbench.errors import KdbenchError, RanksOutOfStepError
from kdbench.results import device_info, is_done, read_result, run_path, versions, write_result
from kdbench.run.context import Context, for_task, teacher_run_ids
from kdbench.run.kinds import RUNNERS
from kdbench.plan import RunSpec, expand
from kdbench.suite import Suite

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
        needed |= {rid for t in (s.group if s.kind == "multitask" else [s.task])
                   for rid in teacher_run_ids(for_task(s, t))}
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
                from kdbench import profile

                profile.start_memory_server()  # boots (seconds) while the first model trains
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
