"""Synthetic RunResults for the report tests: no training, no torch models; known inputs, pinned outputs.

The fake suite (one task "toy", one pair "tiny", method "kd", seeds 0 and 1):
    teacher         metric 0.90, 400 kB, latency b8 40 ms
    student alone   0.60 / 0.70, 100 kB, b8 4.0 / 6.0 ms
    kd (distilled)  0.80 / 0.84, 100 kB, b8 4.0 / 4.4 ms, trained 10 / 14 s
    kd + int8       0.79 / 0.83,  50 kB, b8 8.0 / 8.0 ms                       (quantization)
    kd + ps+int8    0.812 / 0.820, 40 kB, b8 5.0 / 5.0 ms, 2 s recovery         (combined)
    kd seed 2       failed
"""

from __future__ import annotations

import json
from pathlib import Path

TEACHER_METRIC = 0.9


LATENCY_METHOD = "time.perf_counter around model(**batch), batch {bs}, 3 warmup calls, {n} timed calls"


MEMORY_METHOD = "forkserver: peak RSS during one forward at batch 8"


def variant(name, kind, metric, *, size, latency_b8, steps=None, train_s=None, repeats=30, fmt="safetensors"):
    """A variant dict shaped like runner.profile_variant's."""
    latency = {bs: {"median_ms": ms, "repeats": repeats, "method": LATENCY_METHOD.format(bs=bs, n=repeats)}
               for bs, ms in (("1", latency_b8 / 4), ("8", latency_b8))}
    return {
        "name": name, "kind": kind, "metric_name": "accuracy", "metric": metric,
        "retention": metric / TEACHER_METRIC, "params": 1000, "nonzero_params": 900,
        "size": {"bytes": size, "format": fmt, "method": f"{fmt} file size"},
        "latency": latency,
        "speedup_vs_teacher": {"1": 10.0 / latency["1"]["median_ms"], "8": 40.0 / latency_b8},
        "memory": {"peak_mb": 20.0, "method": MEMORY_METHOD},
        "energy": {"joules_per_sample": None, "avg_power_w": None, "method": "n/a: no energy counter for cpu"},
        "compression": {"steps": [{"name": s, "params": {}} for s in steps]} if steps else {},
        "training": {"wall_s": train_s, "steps": int(train_s * 10)} if train_s is not None else None,
    }


def run(kind, seed, variants, *, method="kd", status="ok", error=None, train_s=None, torch="2.13.0"):
    name = {"teacher": "teacher", "student": "student"}.get(kind, method)
    run_id = f"toy__tiny__{name}" + ("" if kind == "teacher" else f"__s{seed}")
    return {
        "run_id": run_id,
        "spec_hash": f"hash-of-{run_id}",  # read_results leaves out a RunResult without one
        "spec": {
            "kind": kind, "seed": seed, "task": {"name": "toy"},
            "method": {"name": method} if kind == "distill" else None,
            "pair": {"name": "tiny",
                     "teacher": {"model": {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2}},
                     "student": {"model": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1}}},
            "profiling": {"batch_sizes": [1, 8]},
        },
        "status": status, "error": error, "error_kind": "bug" if error else None,
        "versions": {"kdbench": "0.1.0", "torch": torch}, "device": {"type": "cpu", "name": "Fake CPU",
                                                                      "threads": 2, "cpus": 2},
        "started": "2026-01-02T03:04:05+00:00",
        "training": {"wall_s": train_s} if train_s is not None else None,
        "variants": variants,
    }


def distill_run(seed, distilled, int8, combined, train_s):
    return run("distill", seed, [
        variant("distilled", "distilled", distilled, size=100_000, latency_b8=4.0 + 0.4 * seed, train_s=train_s),
        variant("int8", "compressed", int8, size=50_000, latency_b8=8.0, steps=["int8"], fmt="torch.save",
                repeats=5 + seed),
        variant("ps+int8", "compressed", combined, size=40_000, latency_b8=5.0,
                steps=["prune_structured", "int8"], train_s=2.0, fmt="torch.save"),
    ], train_s=train_s)


def fake_runs() -> list[dict]:
    return [
        run("teacher", 0, [variant("teacher", "teacher", TEACHER_METRIC, size=400_000, latency_b8=40.0,
                                   train_s=100.0)], train_s=100.0),
        run("student", 0, [variant("student", "student", 0.60, size=100_000, latency_b8=4.0, train_s=8.0)]),
        run("student", 1, [variant("student", "student", 0.70, size=100_000, latency_b8=6.0, train_s=8.0)]),
        distill_run(0, 0.80, 0.79, 0.812, train_s=10.0),
        distill_run(1, 0.84, 0.83, 0.820, train_s=14.0),
        run("distill", 2, [], status="failed", error="RuntimeError: boom"),
    ]


def write_suite(folder: Path, runs: list[dict]) -> Path:
    (folder / "runs").mkdir(parents=True)
    for r in runs:
        (folder / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))
    return folder


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in `text` as a list of {header: cell} rows."""
    found, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            header, *body = block
            found.append([dict(zip(header, cells)) for cells in body[1:]])  # body[0] is the alignment row
            block = []
    return found


def row_of(table: list[dict], **match) -> dict:
    hits = [r for r in table if all(r.get(k) == v for k, v in match.items())]
    assert len(hits) == 1, (match, table)
    return hits[0]
