"""`kdbench run --ray`: a tiny suite on the two-node cluster (conftest.py), against the same suite in-process."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from kdbench.results import read_results  # noqa: E402
from kdbench.run.ray_runs import run_suite_on_ray  # noqa: E402
from kdbench.run.runner import run_suite  # noqa: E402
from tiny import tiny_suite  # noqa: E402

KD = {"name": "kd", "method": "logit", "params": {"temperature": 2.0, "alpha": 0.5}}
KD_SFT = {**KD, "name": "kd-sft", "start_from": "student"}
STUDENT = "sentiment__pair__student__s0"


def metrics(results_dir: Path) -> dict:
    return {r["run_id"]: {v["name"]: v["metric"] for v in r["variants"]} for r in read_results(results_dir)}


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_suite_on_two_nodes_gives_the_in_process_metrics_and_only_the_driver_writes(cluster, tmp_path):
    for d in ("here", "ray"):
        (tmp_path / d).mkdir()
    here = tiny_suite(tmp_path / "here", tmp_path / "here-cache", [KD, KD_SFT])
    run_suite(here, show_progress=False)
    there = tiny_suite(tmp_path / "ray", tmp_path / "driver-cache", [KD, KD_SFT])
    outcome = run_suite_on_ray(there, show_progress=False)
    out = tmp_path / "ray" / "results" / "tiny"
    assert [r.status for r in outcome.runs] == ["ok"] * 4
    assert metrics(out) == metrics(tmp_path / "here" / "results" / "tiny")
    # the workers used their own nodes' caches, never the driver's, and wrote nothing beside the driver's files
    assert not (tmp_path / "driver-cache").exists()
    assert any((cluster[n] / "teachers").is_dir() for n in "ab")
    assert files(out) == files(tmp_path / "here" / "results" / "tiny")
    for r in read_results(out):
        assert r["node"]["engine"] == "ray" and r["node"]["node_id"] and r["node"]["attempts"] == 1


def kill_when_running(run_id: str, timeout: float = 120.0) -> threading.Thread:
    """From the test: find the worker whose process title names the run (Ray titles it `ray::kdbench:<id>`) and
    SIGKILL it, as a lost worker."""
    title = f"kdbench:{run_id}".encode()

    def run():
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc in Path("/proc").iterdir():
                try:
                    if proc.name.isdigit() and title in (proc / "cmdline").read_bytes():
                        os.kill(int(proc.name), signal.SIGKILL)
                        return
                except OSError:
                    continue
            time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_a_student_whose_worker_is_killed_is_retried_and_the_suite_completes(cluster, tmp_path):
    suite = tiny_suite(tmp_path, tmp_path / "cache", [KD_SFT], max_retries=1)
    killer = kill_when_running(STUDENT)
    outcome = run_suite_on_ray(suite, show_progress=False)
    killer.join()
    assert not killer.is_alive()
    assert [r.status for r in outcome.runs] == ["ok"] * 3
    by_id = {r["run_id"]: r for r in read_results(tmp_path / "results" / "tiny")}
    assert by_id[STUDENT]["node"]["attempts"] == 2


@pytest.mark.slow
def test_with_no_retries_the_killed_run_is_recorded_failed_and_the_others_finish(cluster, tmp_path):
    suite = tiny_suite(tmp_path, tmp_path / "cache", [KD, KD_SFT], max_retries=0)
    killer = kill_when_running(STUDENT)
    outcome = run_suite_on_ray(suite, show_progress=False)
    killer.join()
    status = {r.run_id: (r.status, r.error) for r in outcome.runs}
    assert status[STUDENT][0] == "failed" and status[STUDENT][1].startswith("WorkerCrashedError after 1 attempt")
    assert status["sentiment__pair__kd-sft__s0"] == ("failed", f"not run: job {STUDENT!r} it depends on failed")
    assert status["sentiment__pair__kd__s0"][0] == "ok" and status["sentiment__pair__teacher"][0] == "ok"
    written = {r["run_id"]: r for r in read_results(tmp_path / "results" / "tiny")}
    assert written[STUDENT]["status"] == "failed" and written[STUDENT]["error_kind"] == "worker"


def test_the_plan_orders_runs_and_takes_resources_from_the_suite_or_the_method(tmp_path):
    from kdbench.run.context import Context
    from kdbench.run.ray_runs import plan_jobs
    from kdbench.plan import expand

    gpu_kd = {**KD, "resources": {"gpus_per_run": 0.5, "cpus_per_run": 2}}
    suite = tiny_suite(tmp_path, tmp_path / "cache", [gpu_kd, KD_SFT], max_retries=3,
                       resources={"gpus_per_run": 0, "cpus_per_run": 1})
    specs = expand(suite)
    ctx = Context(suite, tmp_path / "results" / "tiny", "cpu")
    jobs, seeds = plan_jobs(suite, specs, {s.run_id for s in specs}, ctx)
    by_id = {j.id: j for j in jobs}
    teacher = "sentiment__pair__teacher"
    assert by_id[teacher].deps == () and by_id[STUDENT].deps == (teacher,)
    assert by_id["sentiment__pair__kd__s0"].deps == (teacher,)
    assert by_id["sentiment__pair__kd-sft__s0"].deps == (teacher, STUDENT)
    assert [p.split("/")[0] for p in by_id[teacher].produces] == ["tokenizers", "teachers"]
    assert [p.split("/")[0] for p in by_id[STUDENT].produces] == ["students"]
    assert (by_id["sentiment__pair__kd__s0"].num_gpus, by_id["sentiment__pair__kd__s0"].num_cpus) == (0.5, 2)
    assert (by_id[STUDENT].num_gpus, by_id[STUDENT].num_cpus) == (0, 1)
    assert {j.max_retries for j in jobs} == {3} and seeds == {}
    # a method's resources say where it runs, not what it computes: the run's hash does not see them
    plain = tiny_suite(tmp_path, tmp_path / "cache", [KD, KD_SFT])
    assert [s.spec_hash for s in expand(plain)] == [s.spec_hash for s in specs]


def test_a_cached_teachers_top_k_is_made_once_and_travels_to_the_other_runs(tmp_path):
    """Under Ray the first run of a top-k method makes the teacher's top-k tokens; the runs that read the same
    cache wait for it and receive it, instead of each running the teacher again on its node."""
    from kdbench.plan import expand
    from kdbench.run.context import Context
    from kdbench.run.ray_runs import plan_jobs

    top_k = {"name": "kd-top-k", "method": "logit", "params": {"temperature": 2.0, "teacher_top_k": 4}}
    suite = tiny_suite(tmp_path, tmp_path / "cache", [KD, top_k], seeds=[0, 1])
    specs = expand(suite)
    ctx = Context(suite, tmp_path / "results" / "tiny", "cpu")
    by_id = {j.id: j for j in plan_jobs(suite, specs, {s.run_id for s in specs}, ctx)[0]}
    first, second = by_id["sentiment__pair__kd-top-k__s0"], by_id["sentiment__pair__kd-top-k__s1"]
    [made] = [p for p in first.produces if p.startswith("sparse_teacher/")]
    assert first.deps == ("sentiment__pair__teacher",)
    assert second.deps == ("sentiment__pair__teacher", first.id) and made not in second.produces
    assert not any(p.startswith("sparse_teacher/") for j in by_id.values() if "__kd__" in j.id for p in j.produces)
