"""In-process vs local Ray (2 workers) on a suite of 8 independent student runs (+ their teacher); writes
results/ray/measure.json. Run: python results/ray/measure.py"""

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from tiny import tiny_suite  # noqa: E402


def main():
    import torch

    from kdbench.run import ray_cluster
    from kdbench.run.context import Context
    from kdbench.run.ray_runs import plan_jobs
    from kdbench.run.runner import run_suite
    from kdbench.plan import expand

    torch.set_num_threads(1)  # as a Ray worker with 1 CPU: the same arithmetic on both sides
    root = Path(tempfile.mkdtemp(prefix="kdray-measure-"))
    seeds = list(range(8))
    (root / "here").mkdir()
    (root / "ray").mkdir()
    here = tiny_suite(root / "here", root / "here-cache", [], seeds=seeds, training={"max_steps": 30, "batch_size": 16,
                                                                                      "max_seq_length": 32})
    t0 = time.perf_counter()
    run_suite(here, show_progress=False)
    wall_here = time.perf_counter() - t0
    in_process = {json.loads(p.read_text())["run_id"]: json.loads(p.read_text())["wall_s"]
                  for p in (root / "here" / "results" / "tiny" / "runs").glob("*.json")}
    there = tiny_suite(root / "ray", root / "ray-cache", [], seeds=seeds, training={"max_steps": 30, "batch_size": 16,
                                                                                     "max_seq_length": 32})
    ray_cluster.init_ray(None, num_cpus=2, include_dashboard=False)
    specs = expand(there)
    jobs, seeds_ = plan_jobs(there, specs, {s.run_id for s in specs}, Context(there, root / "ray" / "r", "cpu"))
    t0 = time.perf_counter()
    out = ray_cluster.run_jobs(jobs, seeds=seeds_)
    wall_ray = time.perf_counter() - t0
    rows = []
    for job_id, o in out.items():
        rows.append({"run": job_id, "status": o.status, "in_process_s": in_process.get(job_id),
                     "worker_fn_s": round(o.fn_s, 3), "run_wall_s": o.value["wall_s"],
                     "dispatch_s": None, "transfer_s": round(sum(t["seconds"] for t in o.transfers), 3),
                     "return_s": round(o.finished_at - o.ended_at, 3), "started_at": o.started_at,
                     "ended_at": o.ended_at, "submitted_at": o.submitted_at, "node": o.node["pid"]})
    # dispatch: from the moment a worker slot was free (the job submitted, and one of the 2 slots idle) to its start
    ends = sorted(r["ended_at"] for r in rows)
    for r in rows:
        earlier = [e for e in ends if e <= r["started_at"]]
        busy_until = earlier[-2] if len(earlier) >= 2 else 0.0
        r["dispatch_s"] = round(r["started_at"] - max(r["submitted_at"], busy_until), 3)
    json.dump({"wall_in_process_s": wall_here, "wall_ray_s": wall_ray, "runs": rows},
              open(Path(__file__).with_name("measure.json"), "w"), indent=1)
    print(json.dumps({"wall_in_process_s": wall_here, "wall_ray_s": wall_ray}, indent=1))


if __name__ == "__main__":
    main()
