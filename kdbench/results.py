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

A file in runs/ that cannot be used (not UTF-8, not JSON, truncated, or not shaped like a RunResult) never stops
a suite or a report: `read_result` treats it as absent, so its run runs again, and `bad_results` names each such
file with the reason, for the one warning line the CLI prints.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError

from kdbench.errors import KdbenchError

RUNS = "runs"


def run_path(results_dir: Path, run_id: str) -> Path:
    """results_dir/runs/<run_id>.json; a run id that would step out of runs/ is refused."""
    if not run_id or run_id in (".", "..") or any(c in run_id for c in ("/", "\\", "\0")):
        raise KdbenchError(f"run id {run_id!r} cannot be a file name in {Path(results_dir) / RUNS}")
    return Path(results_dir) / RUNS / f"{run_id}.json"


# The shape of a RunResult, as far as the runner and the report read it without checking: a file that lacks it
# is left out with its reason, instead of failing on a missing key deep inside the report.
class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Named(_Loose):
    name: str


class _Pair(_Named):
    teacher: dict | None  # None for a pair with `teachers`
    student: dict


class _Spec(_Loose):
    kind: str
    seed: int
    task: _Named
    pair: _Pair
    method: _Named | None = None


class _Device(_Loose):
    type: str
    name: str


class _Variant(_Named):
    kind: str
    metric: float | None = None


class _FailedVariant(_Named):
    error: str


class _RunResult(_Loose):
    run_id: str
    status: Literal["ok", "failed"]
    spec: _Spec
    spec_hash: str
    error: str | None = None
    versions: dict[str, str | None]
    device: _Device
    variants: list[_Variant]
    failed_variants: list[_FailedVariant] = []


class BadResult(NamedTuple):
    path: Path
    reason: str  # one line: "not UTF-8 text ...", "not valid JSON ...", "not a RunResult: ..."


class _Unusable(Exception):
    pass


def _load(path: Path) -> dict:
    """The RunResult in `path`; FileNotFoundError when there is none, _Unusable(reason) when it cannot be used."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Unusable(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Unusable(f"not valid JSON, truncated or edited ({e.msg}: line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise _Unusable("not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise _Unusable(f"not a RunResult: a JSON {type(data).__name__} instead of an object")
    try:
        _RunResult.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise _Unusable(f"not a RunResult: {where}: {err['msg']}") from None
    return data


def read_result(path: Path) -> dict | None:
    """The RunResult in `path`, or None when there is none or it cannot be used (see `bad_results`)."""
    try:
        return _load(Path(path))
    except (OSError, _Unusable):
        return None


def check_result(path: Path) -> BadResult | None:
    """Why the file at `path` cannot be used as a RunResult, or None when it can (or does not exist)."""
    try:
        _load(Path(path))
    except FileNotFoundError:
        return None
    except OSError as e:
        return BadResult(Path(path), f"cannot read: {e.strerror or e}")
    except _Unusable as e:
        return BadResult(Path(path), str(e))
    return None


def bad_results(results_dir: Path) -> list[BadResult]:
    """Every file in results_dir/runs/ that `read_result` ignores, with the reason."""
    found = (check_result(p) for p in sorted((Path(results_dir) / RUNS).glob("*.json")))
    return [b for b in found if b is not None]


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a result is meant to be read by others
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
