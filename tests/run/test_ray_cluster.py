"""The Ray engine on a two-node cluster on this machine (ray.cluster_utils.Cluster): each node has one CPU, its own
temporary directory and its own node cache, so an artifact reaches the other node only through the engine."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from kdbench.run import node_cache, ray_cluster  # noqa: E402
from kdbench.run.ray_cluster import Job  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the toy jobs below travel to the workers


def on(node: str) -> dict:
    return {f"node_{node}": 0.01}


# ---------------------------------------------------------------------------------------------------------------
# Toy jobs: module-level, so that they pickle; they take the node cache first, as every job does.


def make(cache: Path, rel: str, text: str, seconds: float = 0.0):
    time.sleep(seconds)  # a slow producer: a dependant that did not wait would find nothing
    (cache / rel).mkdir(parents=True, exist_ok=True)
    (cache / rel / "data.txt").write_text(text)
    return {"made": text, "cache": str(cache), "ended_at": time.time()}


def read(cache: Path, rels: list[str], make_rel: str | None = None):
    seen = {rel: (cache / rel / "data.txt").read_text() if (cache / rel).exists() else None for rel in rels}
    if make_rel:
        make(cache, make_rel, "+".join(str(v) for v in seen.values()))
    return {"seen": seen, "cache": str(cache)}


def die_once(cache: Path, pid_dir: str, seconds: float):
    """Writes its PID, then waits to be killed; a later attempt (a PID file exists already) returns at once."""
    pid_dir = Path(pid_dir)
    first = not any(pid_dir.iterdir())
    (pid_dir / f"{os.getpid()}.pid").write_text(str(os.getpid()))
    if first:
        time.sleep(seconds)
    return os.getpid()


def fail(cache: Path, counter: str):
    with open(counter, "a") as f:
        f.write("ran\n")
    raise ValueError("bad input: NaN in the labels")


def kill_first_pid(pid_dir: Path, timeout: float = 60.0) -> threading.Thread:
    """From the test: wait for the job's PID file, then SIGKILL that process, as a lost worker."""

    def run():
        deadline = time.time() + timeout
        while time.time() < deadline:
            pids = [int(p.read_text()) for p in pid_dir.glob("*.pid") if p.read_text()]
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                return
            time.sleep(0.1)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# ---------------------------------------------------------------------------------------------------------------


def test_dag_order_and_artifacts_cross_nodes_with_no_shared_disk(cluster):
    jobs = [
        Job("a", make, ("art/a", "A", 1.5), produces=("art/a",), resources=on("a")),
        Job("b", read, (["art/a"], "art/b"), deps=("a",), produces=("art/b",), resources=on("b")),
        Job("c", read, (["art/a", "art/b"],), deps=("a", "b"), resources=on("a")),
        Job("free", make, ("art/free", "F"), resources=on("b")),
    ]
    seen, progress = [], []
    out = ray_cluster.run_jobs(jobs, on_result=seen.append, on_progress=progress.append)
    assert {k: o.status for k, o in out.items()} == dict.fromkeys("abc", "ok") | {"free": "ok"}
    # b ran on the other node and found a's folder there, although that node never ran a
    assert out["b"].value == {"seen": {"art/a": "A"}, "cache": str(cluster["b"])}
    assert out["b"].started_at >= out["a"].value["ended_at"]
    assert {t["path"]: t["how"] for t in out["b"].transfers} == {"art/a": "fetched", "art/b": "packed"}
    assert out["c"].value["seen"] == {"art/a": "A", "art/b": "A"}
    assert {t["path"]: t["how"] for t in out["c"].transfers} == {"art/a": "hit", "art/b": "fetched"}
    assert out["free"].submitted_at < out["a"].finished_at  # an independent job does not wait for others
    assert (cluster["b"] / "art/a/data.txt").read_text() == "A"
    # where each ran, as the driver saw it
    node_of = {k: o.node["node_id"] for k, o in out.items()}
    assert node_of["a"] == node_of["c"] != node_of["b"] == node_of["free"]
    assert all(o.attempts == 1 and o.node["pid"] > 0 for o in out.values())
    assert sorted(o.id for o in seen) == sorted(out)
    assert progress[-1].done == 4 and progress[-1].failed == 0 and progress[-1].running == {}
    assert any(p.running for p in progress)


def test_artifacts_through_a_storage_url(cluster, tmp_path):
    storage = (tmp_path / "store").as_uri()
    jobs = [Job("a", make, ("art/s", "S"), produces=("art/s",), resources=on("a")),
            Job("b", read, (["art/s"],), deps=("a",), resources=on("b"))]
    out = ray_cluster.run_jobs(jobs, storage=storage)
    assert out["b"].value["seen"] == {"art/s": "S"}
    assert (tmp_path / "store" / "art" / "s.tar").is_file()


def test_a_driver_seed_reaches_a_node_that_lacks_it(cluster, tmp_path):
    (tmp_path / "t" / "seeded").mkdir(parents=True)
    (tmp_path / "t" / "seeded" / "data.txt").write_text("from an earlier session")
    out = ray_cluster.run_jobs([Job("b", read, (["art/seeded"],), needs=("art/seeded",), resources=on("b"))],
                               seeds={"art/seeded": tmp_path / "t" / "seeded"})
    assert out["b"].value["seen"] == {"art/seeded": "from an earlier session"}


def test_a_killed_worker_is_retried_and_the_dag_completes(cluster, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    killer = kill_first_pid(pids)
    jobs = [Job("victim", die_once, (str(pids), 120.0), max_retries=2, resources=on("b")),
            Job("after", read, ([],), deps=("victim",)),
            Job("other", read, ([],), resources=on("a"))]
    out = ray_cluster.run_jobs(jobs)
    killer.join()
    assert {k: o.status for k, o in out.items()} == {"victim": "ok", "after": "ok", "other": "ok"}
    assert out["victim"].attempts == 2 and len(list(pids.glob("*.pid"))) == 2
    first_pid = {int(p.stem) for p in pids.glob("*.pid")} - {out["victim"].value}
    assert len(first_pid) == 1  # the retry ran in another process than the killed one


def test_no_retries_left_records_the_crash_and_the_rest_finishes(cluster, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    killer = kill_first_pid(pids)
    jobs = [Job("victim", die_once, (str(pids), 120.0), max_retries=0, resources=on("b")),
            Job("after", read, ([],), deps=("victim",)),
            Job("other", read, ([],), resources=on("a"))]
    out = ray_cluster.run_jobs(jobs)
    killer.join()
    assert out["victim"].status == "failed" and out["victim"].attempts == 1
    assert out["victim"].reason.startswith("WorkerCrashedError after 1 attempt(s)")
    assert out["after"].status == "failed" and out["after"].reason == "not run: job 'victim' it depends on failed"
    assert out["other"].status == "ok"


def test_an_error_raised_by_the_job_is_recorded_once_not_retried(cluster, tmp_path):
    counter = tmp_path / "ran.txt"
    out = ray_cluster.run_jobs([Job("bad", fail, (str(counter),), max_retries=3),
                                Job("fine", read, ([],))])
    assert out["bad"].status == "failed" and out["bad"].reason == "ValueError: bad input: NaN in the labels"
    assert "Traceback" in out["bad"].traceback and out["bad"].attempts == 1
    assert counter.read_text() == "ran\n"
    assert out["fine"].status == "ok"


def test_a_job_no_node_can_run_fails_at_once(cluster):
    out = ray_cluster.run_jobs([Job("gpu", read, ([],), num_gpus=1), Job("cpu", read, ([],))])
    assert out["gpu"].status == "failed" and "GPU=1" in out["gpu"].reason and "GPU=0" in out["gpu"].reason
    assert out["cpu"].status == "ok"


def test_ctrl_c_cancels_the_outstanding_jobs_and_keeps_what_finished(cluster, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    jobs = [Job("quick", read, ([],), resources=on("a")),
            Job("long", die_once, (str(pids), 120.0), resources=on("b")),
            Job("later", read, ([],), deps=("long",))]
    seen = []

    def interrupt(p):
        if "long" in p.running and p.done >= 1 and list(pids.glob("*.pid")):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ray_cluster.run_jobs(jobs, on_result=seen.append, on_progress=interrupt)
    assert {o.id: o.status for o in seen} == {"quick": "ok", "long": "cancelled", "later": "cancelled"}
    pid = int(next(pids.glob("*.pid")).stem)
    deadline = time.time() + 30
    while time.time() < deadline and Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid), "the cancelled job's worker still runs"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "gone"


def test_a_cycle_or_an_unknown_dependency_is_refused_before_anything_runs():
    from kdbench.run.ray_cluster import _order

    with pytest.raises(ValueError, match="cycle: x -> y -> x"):
        _order([Job("x", read, deps=("y",)), Job("y", read, deps=("x",))])
    with pytest.raises(ValueError, match="unknown job 'z'"):
        _order([Job("x", read, deps=("z",))])
    assert [j.id for j in _order([Job("late", read, deps=("early",)), Job("early", read)])] == ["early", "late"]
