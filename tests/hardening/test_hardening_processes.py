"""Real `kdbench run` processes (issue 14, "Concurrency and signals"), each bounded in time:
- a second run of one results folder waits with a message, or refuses with --no-wait (exit 2); the runs the first
  one made are not made again;
- SIGINT and SIGTERM stop a run with one message (how many runs are finished and kept, and that re-running
  resumes), exit 130 or 143, no traceback; re-running resumes.

Where an order of events matters, the test holds the folder's lock itself, so nothing depends on timing.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from kdbench.lock import LOCK_FILE

SMOKE = Path(__file__).resolve().parents[2] / "suites" / "smoke.yaml"
RUNS = ["sentiment__pair__teacher", "sentiment__pair__student__s0", "sentiment__pair__logit-kd__s0"]

pytestmark = pytest.mark.slow


def tiny_suite(folder: Path, *, student_steps: int = 2) -> Path:
    data = yaml.safe_load(SMOKE.read_text())
    data.update(compression=[], output_dir=str(folder / "results"), cache_dir=str(folder / "cache"))
    data["pairs"][0]["name"] = "pair"
    data["pairs"][0]["teacher"]["finetune"] = {"max_steps": 2, "batch_size": 16}
    data["training"] = {"max_steps": student_steps, "batch_size": 16, "max_seq_length": 32}
    data["profiling"] = {"batch_sizes": [1], "warmup": 0, "min_repeats": 1, "max_repeats": 1,
                         "time_budget_s": 0.01, "memory": False}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdbench.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"kdbench did not finish within {timeout} s; stderr: {err[-2000:]}")
    return proc.returncode, out, err


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"kdbench exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no {what} within {timeout} s")


def read_line_with(proc: subprocess.Popen, fragment: str, timeout: float = 120) -> str:
    """The first stderr line of `proc` holding `fragment` (read as it comes)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=1):
            line = proc.stderr.readline()
            if fragment in line:
                return line.rstrip("\n")
            if not line and proc.poll() is not None:
                break
    proc.kill()
    pytest.fail(f"no stderr line with {fragment!r} within {timeout} s")


def ok_runs(out: Path) -> set[str]:
    return {p.stem for p in (out / "runs").glob("*.json") if json.loads(p.read_text())["status"] == "ok"}


# ---------------------------------------------------------------------------------------------------------------
# The lock


def test_no_wait_refuses_a_folder_in_use(tmp_path):
    suite = tiny_suite(tmp_path)
    out = tmp_path / "results" / "smoke"
    out.mkdir(parents=True)
    with FileLock(str(out / LOCK_FILE)):
        code, stdout, stderr = finish(start("run", suite, "--no-wait"), timeout=120)
    assert code == 2, stderr
    assert stderr.splitlines() == [f"error: results folder {out} is in use by another kdbench run; wait for it to "
                                   "finish, or drop --no-wait to wait for it"]
    assert not (out / "runs").exists()


def test_a_second_run_waits_and_repeats_nothing(tmp_path):
    """Both runs start while the folder is held; once it is free, one runs the suite and the other, after it, finds
    every run done: the teacher is trained once."""
    suite = tiny_suite(tmp_path)
    out = tmp_path / "results" / "smoke"
    out.mkdir(parents=True)
    held = FileLock(str(out / LOCK_FILE))
    held.acquire()
    try:
        first, second = start("run", suite), start("run", suite)
        messages = [read_line_with(p, "waiting for it to finish") for p in (first, second)]
    finally:
        held.release()
    results = [finish(p) for p in (first, second)]
    for line in messages:
        assert line == f"kdbench: results folder {out} is in use by another kdbench run; waiting for it to finish " \
                       "(Ctrl-C to stop)"
    for code, stdout, stderr in results:
        assert code == 0, stderr
        assert "Traceback" not in stderr
    summaries = sorted(next(line for line in stdout.splitlines() if line.startswith("runs: "))
                       for _, stdout, _ in results)
    assert summaries == ["runs: 0 ok, 0 failed, 3 already done", "runs: 3 ok, 0 failed, 0 already done"]
    assert ok_runs(out) == set(RUNS)
    teachers = list((tmp_path / "cache" / "teachers").iterdir())
    assert len(teachers) == 1


def test_the_refusal_names_the_process_that_holds_the_folder(tmp_path):
    import os
    import socket

    from kdbench.lock import results_lock

    suite = tiny_suite(tmp_path)
    out = tmp_path / "results" / "smoke"
    with results_lock(out):  # as a `kdbench run` takes it: with a note naming this process
        code, _, stderr = finish(start("run", suite, "--no-wait"), timeout=120)
    assert code == 2
    (line,) = stderr.splitlines()
    assert line.startswith(f"error: results folder {out} is in use by kdbench run pid {os.getpid()} on "
                           f"{socket.gethostname()} since "), line


# ---------------------------------------------------------------------------------------------------------------
# Signals


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_training_keeps_finished_runs_and_rerunning_resumes(tmp_path, sig, code):
    # the student trains for many steps: the signal comes while it trains, after the teacher's result is written
    suite = tiny_suite(tmp_path, student_steps=200_000)
    out = tmp_path / "results" / "smoke"
    proc = start("run", suite)
    wait_for(lambda: (out / "runs" / f"{RUNS[0]}.json").exists(), 180, "teacher result", proc)
    time.sleep(1.0)  # into the student's training
    proc.send_signal(sig)
    returncode, stdout, stderr = finish(proc, timeout=120)
    assert returncode == code, stderr
    assert "Traceback" not in stderr
    kept = ok_runs(out)
    assert kept == {RUNS[0]}
    assert stderr.splitlines()[-1] == (
        f"interrupted ({signal.Signals(sig).name}): 1 of 3 runs are finished and kept in {out / 'runs'}; run the "
        "same command again to resume (finished runs are not repeated)")
    teacher = (out / "runs" / f"{RUNS[0]}.json").read_bytes()
    # the same command resumes: the teacher is done, the rest is to run (listed here, not trained)
    returncode, stdout, _ = finish(start("run", suite, "--dry-run"), timeout=120)
    assert returncode == 0
    assert stdout.splitlines() == [f"done  {RUNS[0]}", f"run   {RUNS[1]}", f"run   {RUNS[2]}"]
    returncode, stdout, stderr = finish(start("run", suite, "--only", RUNS[0]), timeout=120)
    assert returncode == 0, stderr
    assert "runs: 0 ok, 0 failed, 1 already done" in stdout.splitlines()
    assert (out / "runs" / f"{RUNS[0]}.json").read_bytes() == teacher


def test_a_signal_while_waiting_for_the_folder(tmp_path):
    suite = tiny_suite(tmp_path)
    out = tmp_path / "results" / "smoke"
    out.mkdir(parents=True)
    with FileLock(str(out / LOCK_FILE)):
        proc = start("run", suite)
        read_line_with(proc, "waiting for it to finish")
        proc.send_signal(signal.SIGTERM)
        returncode, _, stderr = finish(proc, timeout=60)
    assert returncode == 143
    assert stderr.splitlines()[-1] == (f"interrupted (SIGTERM): 0 of 3 runs are finished and kept in {out / 'runs'}; "
                                       "run the same command again to resume (finished runs are not repeated)")
    assert "Traceback" not in stderr
