"""Where a run writes: the results folder stays inside its base, every run's file inside runs/, and the results and
cache folders can be written before anything trains (an unwritable folder found after the teacher trained loses
that work)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kdbench.errors import KdbenchError
from kdbench.results import RUNS, run_path


def check_inside(base: Path, results_dir: Path, run_ids: list[str]) -> None:
    """`results_dir` lies inside `base`, and each run's file inside results_dir/runs (lexically: a symlink a user
    made on purpose is followed)."""
    base_n, out_n = os.path.normpath(os.path.abspath(base)), os.path.normpath(os.path.abspath(results_dir))
    if os.path.commonpath([base_n, out_n]) != base_n or out_n == base_n:
        raise KdbenchError(f"results folder {results_dir} is not inside {base}; the suite's name must be a "
                           "folder name")
    runs = os.path.join(out_n, RUNS)
    for run_id in run_ids:
        p = os.path.normpath(os.path.abspath(run_path(results_dir, run_id)))
        if os.path.dirname(p) != runs:
            raise KdbenchError(f"run {run_id}: its result would be written outside {runs}")


def check_writable(folder: Path, what: str) -> None:
    """Make `folder` if needed and write a file in it; one KdbenchError naming it if that fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".kdbench-write-check."):
            pass
    except OSError as e:
        raise KdbenchError(f"{what} {folder} is not writable: {e.strerror or e}") from None


def check_folders(results_dir: Path, cache_dir: Path) -> None:
    """The results folder (and its runs/, where it exists) and the cache folder are writable."""
    check_writable(results_dir, "results folder")
    if (Path(results_dir) / RUNS).exists():
        check_writable(Path(results_dir) / RUNS, "results folder")
    check_writable(cache_dir, "cache folder")
