"""RunResult files: one JSON per run, written atomically, read back by the report and by resumed suites.

Layout: <results_dir>/runs/<run_id>.json with keys
    run_id, spec (the resolved RunSpec), spec_hash, data_key (hash of the task's data), status ("ok" | "failed"),
    error, error_kind,
    versions, device, started, wall_s, training (wall_s, steps, samples, samples_per_s, world_size),
    distributed (only under torchrun: world_size, backend, measured_on_rank),
    variants: [{name, kind, metric_name, metric, retention, params, nonzero_params,
                size {bytes, format, method}, latency {batch size: {median_ms, p90_ms, ..., method}},
                speedup_vs_teacher {batch size: x}, memory {peak_mb, method}, energy {joules_per_sample, method},
                compression {steps: [...]}, training {wall_s, steps, samples, samples_per_s, world_size}}]
samples counts the rows of every process (steps x batch size x world size).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

RUNS = "runs"


def run_path(results_dir: Path, run_id: str) -> Path:
    return Path(results_dir) / RUNS / f"{run_id}.json"


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_results(results_dir: Path) -> list[dict]:
    runs = sorted((Path(results_dir) / RUNS).glob("*.json"))
    return [r for r in (read_result(p) for p in runs) if r is not None]


def is_done(path: Path, spec_hash: str, data_key: str | None, *, world_size: int = 1) -> bool:
    """A run is skipped when its result exists, succeeded, and was made from the same spec and the same data (an
    edited data file, or a generator changed between versions, re-runs it; so does unloadable data, which fails),
    with as many data-parallel processes as now (each trains on its own share of a step's rows)."""
    r = read_result(path)
    return (bool(r) and r.get("status") == "ok" and r.get("spec_hash") == spec_hash
            and data_key is not None and r.get("data_key") == data_key
            and (r.get("distributed") or {}).get("world_size", 1) == world_size)


def versions() -> dict[str, str | None]:
    import torch
    import transformers

    import kdbench

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "kdbench": kdbench.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }


def device_info(device: str) -> dict[str, Any]:
    import torch

    if device.startswith("cuda"):  # "cuda", or "cuda:<LOCAL_RANK>" under torchrun
        name = torch.cuda.get_device_name(torch.device(device).index if ":" in device else None)
    else:
        name = platform.processor() or platform.machine()
        try:  # the model name is more telling than "x86_64"
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {"type": device.split(":")[0], "name": name, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
