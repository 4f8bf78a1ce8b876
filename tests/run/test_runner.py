"""The suite loop: failures are recorded and the suite goes on, finished runs are never lost, results are atomic,
and a result is reused only for the same spec, data and process count."""

import json
from pathlib import Path

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.methods import methods
from kdbench.methods.logit import LogitKD
from kdbench.results import is_done, read_result, run_path, write_result
from kdbench.run import kinds, runner
from kdbench.run.context import Context
from kdbench.run.runner import keep_finished, run_suite
from kdbench.plan import expand
from tiny import tiny_suite


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Shared by the tests of this file: the teacher is fine-tuned once and loaded from here afterwards."""
    return tmp_path_factory.mktemp("cache")


class NanKD(LogitKD):
    """A method whose loss is NaN from the first step: how a diverging run looks to the runner."""

    def loss(self, student_out, teacher_out, labels):
        return super().loss(student_out, teacher_out, labels) * float("nan")


@pytest.fixture
def nan_method(monkeypatch):
    monkeypatch.setitem(methods._entries, "nan_loss", NanKD)


def snapshot(results_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((results_dir / "runs").glob("*.json"))}


def statuses(outcome) -> dict[str, str]:
    return {r.run_id.split("__", 2)[2]: r.status for r in outcome.runs}


KD = {"name": "kd", "method": "logit", "params": {"temperature": 2.0}}
NAN = {"name": "nan", "method": "nan_loss"}
KD_AFTER = {"name": "kd-after", "method": "logit", "params": {"alpha": 0.9}}


def test_a_failed_run_is_recorded_the_suite_goes_on_and_nothing_is_lost(tmp_path, cache_dir, nan_method):
    first = run_suite(tiny_suite(tmp_path, cache_dir, [KD]), show_progress=False)
    assert statuses(first) == {"teacher": "ok", "student__s0": "ok", "kd__s0": "ok"}
    assert first.exit_code == 0
    out = first.results_dir
    assert out == tmp_path / "results" / "tiny"
    finished = snapshot(out)
    assert len(finished) == 3

    # The same suite with a method whose loss is NaN, then one more method after it.
    suite = tiny_suite(tmp_path, cache_dir, [KD, NAN, KD_AFTER])
    second = run_suite(suite, show_progress=False)
    assert statuses(second) == {"teacher": "skipped", "student__s0": "skipped", "kd__s0": "skipped",
                                "nan__s0": "failed", "kd-after__s0": "ok"}
    assert second.exit_code == 2  # a NaN loss is reported like bad input: one line, exit code 2
    [failed] = second.failed
    assert failed.error_kind == "input" and failed.error == "loss is nan at step 1; run stopped"

    after = snapshot(out)
    assert {k: after[k] for k in finished} == finished  # finished runs untouched, byte for byte
    record = read_result(run_path(out, "sentiment__pair__nan__s0"))
    assert record["status"] == "failed" and record["error_kind"] == "input"
    assert record["error"] == "loss is nan at step 1; run stopped" and record["variants"] == []
    spec = next(s for s in expand(suite) if s.run_id == "sentiment__pair__nan__s0")
    assert record["spec_hash"] == spec.spec_hash and record["spec"] == spec.model_dump(mode="json")
    assert record["versions"]["torch"] == torch.__version__ and record["device"]["type"] == "cpu"
    assert read_result(run_path(out, "sentiment__pair__kd-after__s0"))["status"] == "ok"

    readme = (out / "README.md").read_text()
    [failed_line] = [line for line in readme.splitlines() if "sentiment__pair__nan__s0" in line]
    assert "loss is nan at step 1" in failed_line
    assert any(line.startswith("|") and "kd-after" in line for line in readme.splitlines())

    # Failed runs are retried on the next invocation; finished ones are not.
    third = run_suite(suite, show_progress=False)
    assert statuses(third) == {"teacher": "skipped", "student__s0": "skipped", "kd__s0": "skipped",
                               "nan__s0": "failed", "kd-after__s0": "skipped"}
    assert {k: v for k, v in snapshot(out).items() if "nan" not in k} == {
        k: v for k, v in after.items() if "nan" not in k}


def test_a_bug_is_recorded_with_its_traceback_and_exit_code_1(tmp_path, cache_dir, monkeypatch):
    def broken(spec, ctx):
        raise ZeroDivisionError("a bug in the student run")

    monkeypatch.setitem(kinds.RUNNERS, "student", broken)
    outcome = run_suite(tiny_suite(tmp_path, cache_dir, [KD], seeds=[0, 1]), show_progress=False)
    assert statuses(outcome) == {"teacher": "ok", "student__s0": "failed", "kd__s0": "ok",
                                 "student__s1": "failed", "kd__s1": "ok"}
    assert outcome.exit_code == 1
    record = read_result(run_path(outcome.results_dir, "sentiment__pair__student__s0"))
    assert record["error"] == "ZeroDivisionError: a bug in the student run" and record["error_kind"] == "bug"
    assert "Traceback" in record["traceback"] and "broken" in record["traceback"]


def test_a_failed_teacher_fails_its_students_in_one_line_each(tmp_path, cache_dir):
    task = {"name": "local", "task": "text_classification",
            "params": {"train_file": str(tmp_path / "missing.tsv"), "eval_file": str(tmp_path / "missing.tsv")}}
    outcome = run_suite(tiny_suite(tmp_path, cache_dir, [KD], tasks=[task]), show_progress=False)
    assert statuses(outcome) == {"teacher": "failed", "student__s0": "failed", "kd__s0": "failed"}
    assert outcome.exit_code == 2
    errors = [r.error for r in outcome.runs]
    assert errors[0] == f"task data file not found: {tmp_path / 'missing.tsv'}"
    assert errors[1:] == ["teacher run local__pair__teacher did not succeed; its students cannot run"] * 2
    readme = (outcome.results_dir / "README.md").read_text()
    assert f"task data file not found: {tmp_path / 'missing.tsv'}" in readme


def test_cuda_requested_without_cuda_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(KdbenchError, match="device: cuda was requested but no CUDA device is available"):
        runner.resolve_device("cuda")
    assert runner.resolve_device("auto") == "cpu"


def test_write_result_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "runs" / "r.json"
    write_result(path, {"status": "ok", "n": 1})
    before = path.read_bytes()

    def crash(obj, f, **kwargs):
        f.write('{"status": "o')  # half a JSON, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", crash)
    with pytest.raises(KeyboardInterrupt):
        write_result(path, {"status": "failed"})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left behind


def test_a_failed_rerun_never_overwrites_a_finished_result(tmp_path):
    path = run_path(tmp_path, "t__p__kd__s0")
    failed = {"run_id": "t__p__kd__s0", "status": "failed"}
    assert keep_finished(path, failed) == path  # nothing there yet: the failure is recorded in place
    # a whole RunResult (a committed one, renamed): a stub of two keys reads as an unusable file, which is no result
    committed = Path(__file__).parents[2] / "results" / "quickstart" / "runs"
    finished = json.loads(next(committed.glob("*.json")).read_text())
    write_result(path, {**finished, "run_id": "t__p__kd__s0"})
    assert keep_finished(path, failed) == tmp_path / "runs" / "failed" / "t__p__kd__s0.json"
    assert keep_finished(path, {"run_id": "t__p__kd__s0", "status": "ok"}) == path  # a new ok replaces it


def test_results_are_rerun_when_the_data_changes_under_the_same_spec(tmp_path, cache_dir):
    """Resuming skips finished runs, but not those whose task data changed: their numbers would be stale."""
    data = tmp_path / "train.tsv"
    task = {"name": "local", "task": "text_classification",
            "params": {"train_file": str(data), "eval_file": str(data), "text_column": "sentence"}}
    rows = ["a good film\t1", "a bad film\t0", "a fine film\t1", "a dull film\t0"]

    def run(lines):
        data.write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
        return {r.run_id.split("__", 2)[-1]: r.status
                for r in run_suite(tiny_suite(tmp_path, cache_dir, [KD], tasks=[task]), show_progress=False).runs}

    assert set(run(rows).values()) == {"ok"}
    assert set(run(rows).values()) == {"skipped"}
    assert set(run(rows[:3] + ["a sad film\t0"]).values()) == {"ok"}
    out = tmp_path / "results" / "tiny"
    keys = {read_result(p)["data_key"] for p in (out / "runs").glob("*.json")}
    assert len(keys) == 1 and None not in keys  # every run carries the key of the data it was made from


def test_results_and_teachers_are_not_reused_across_process_counts(tmp_path, cache_dir, monkeypatch):
    """Under data parallel a step takes batch_size rows from each process: a result or a cached teacher trained
    with another process count is not the same experiment. One process keeps the keys it always had."""
    suite = tiny_suite(tmp_path, cache_dir, [KD])
    spec = expand(suite)[0]
    one = Context(suite, tmp_path / "results", "cpu").teacher_key(spec)
    outcome = run_suite(suite, show_progress=False)
    path = run_path(outcome.results_dir, spec.run_id)
    assert is_done(path, spec.spec_hash, read_result(path)["data_key"])
    assert not is_done(path, spec.spec_hash, read_result(path)["data_key"], world_size=2)
    record = read_result(path)
    write_result(path, {**record, "distributed": {"world_size": 2, "backend": "gloo"}})
    assert is_done(path, spec.spec_hash, record["data_key"], world_size=2)
    assert not is_done(path, spec.spec_hash, record["data_key"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the key needs no process group
    two = Context(suite, tmp_path / "results", "cpu").teacher_key(spec)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert two != one == Context(suite, tmp_path / "results", "cpu").teacher_key(spec)
