"""A bad file in runs/ (issue 14): `run` and `report` never crash on it. Each unreadable, truncated or wrong-shaped
file gets one warning line naming it; `run` runs it again and says so; `report` leaves it out and says how many it
left out. A finished result is never overwritten by a failed run.

One tiny suite (smoke.yaml cut to two training steps, two seeds, no compression) is run once for the module; each
test copies its results folder and spoils files in the copy.
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.results import bad_results, check_result, read_result, read_results

SMOKE = Path(__file__).resolve().parents[2] / "suites" / "smoke.yaml"
TEACHER, STUDENT0, STUDENT1 = ("sentiment__pair__teacher", "sentiment__pair__student__s0",
                               "sentiment__pair__student__s1")
KD0 = "sentiment__pair__logit-kd__s0"


def kdbench(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def tiny_suite(folder: Path, cache: Path) -> Path:
    data = yaml.safe_load(SMOKE.read_text())
    data.update(seeds=[0, 1], compression=[], output_dir=str(folder / "results"), cache_dir=str(cache))
    data["pairs"][0]["name"] = "pair"
    data["pairs"][0]["teacher"]["finetune"] = {"max_steps": 2, "batch_size": 16}
    data["training"] = {"max_steps": 2, "batch_size": 16, "max_seq_length": 32}
    data["profiling"] = {"batch_sizes": [1], "warmup": 0, "min_repeats": 1, "max_repeats": 1,
                         "time_budget_s": 0.01, "memory": False}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(the results folder of a finished tiny suite, its cache) to copy from."""
    tmp = tmp_path_factory.mktemp("finished")
    suite = tiny_suite(tmp, tmp / "cache")
    result = kdbench("run", suite)
    assert result.exit_code == 0, result.output
    return tmp / "results" / "smoke", tmp / "cache"


@pytest.fixture
def copy(finished, tmp_path):
    """A fresh copy of the finished suite: (suite file, results folder), sharing the module's cache (so a run
    that is repeated loads its teacher and students alone instead of training them)."""
    out, cache = finished
    suite = tiny_suite(tmp_path, cache)
    shutil.copytree(out, tmp_path / "results" / "smoke")
    return suite, tmp_path / "results" / "smoke"


def runs_of(out: Path) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in sorted((out / "runs").glob("*.json"))}


def truncated(out: Path, run_id: str) -> bytes:
    text = (out / "runs" / f"{run_id}.json").read_bytes()
    return text[: len(text) // 2]


SPOILS = {
    "not UTF-8": (lambda out, rid: b"\xff\xfe{\x00", "not UTF-8 text (invalid start byte at byte 0)"),
    "a list": (lambda out, rid: b"[1, 2]\n", "not a RunResult: a JSON list instead of an object"),
    "wrong keys": (lambda out, rid: b'{"status": "ok"}\n', "not a RunResult: run_id: Field required"),
    "truncated": (truncated, "not valid JSON, truncated or edited"),
}


# ---------------------------------------------------------------------------------------------------------------
# kdbench.results


@pytest.mark.parametrize("kind", SPOILS)
def test_a_bad_file_is_named_with_its_reason_and_read_as_absent(finished, tmp_path, kind):
    out, _ = finished
    spoil, reason = SPOILS[kind]
    path = tmp_path / f"{STUDENT0}.json"
    path.write_bytes(spoil(out, STUDENT0))
    bad = check_result(path)
    assert bad is not None and bad.path == path and bad.reason.startswith(reason), bad
    assert "\n" not in bad.reason
    assert read_result(path) is None


def test_finished_results_read_back_and_a_missing_file_is_no_problem(finished, tmp_path):
    out, _ = finished
    assert bad_results(out) == []
    assert {r["run_id"] for r in read_results(out)} == set(runs_of(out))
    assert check_result(tmp_path / "missing.json") is None and read_result(tmp_path / "missing.json") is None


# ---------------------------------------------------------------------------------------------------------------
# kdbench run: runs it again and says so; nothing else is touched


@pytest.mark.parametrize("kind", SPOILS)
def test_run_reruns_a_bad_result_and_says_so(copy, kind):
    suite, out = copy
    before = runs_of(out)
    spoil, reason = SPOILS[kind]
    path = out / "runs" / f"{STUDENT1}.json"
    path.write_bytes(spoil(out, STUDENT1))
    result = kdbench("run", suite)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {path}: {reason}"), result.stderr
    assert warnings[0].endswith("; it is run again")
    assert "Traceback" not in result.output
    assert "runs: 1 ok, 0 failed, 4 already done" in result.stdout.splitlines()
    after = runs_of(out)
    assert read_result(path)["status"] == "ok"
    assert {k: v for k, v in after.items() if k != STUDENT1} == {k: v for k, v in before.items() if k != STUDENT1}


def test_a_stray_bad_file_is_ignored_with_a_warning(copy):
    suite, out = copy
    stray = out / "runs" / "notes.json"
    stray.write_text("[]")
    before = runs_of(out)
    result = kdbench("run", suite)
    assert result.exit_code == 0
    assert [line for line in result.stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: {stray}: not a RunResult: a JSON list instead of an object; ignored"]
    assert runs_of(out) == before  # nothing ran again


def test_dry_run_names_a_bad_file_and_lists_its_run_as_to_run(copy):
    suite, out = copy
    (out / "runs" / f"{KD0}.json").write_bytes(b"\xff")
    result = kdbench("run", suite, "--dry-run")
    assert result.exit_code == 0
    assert f"run   {KD0}" in result.stdout.splitlines()
    assert len([line for line in result.stderr.splitlines() if line.startswith("warning:")]) == 1


# ---------------------------------------------------------------------------------------------------------------
# kdbench report: leaves it out and says how many


def test_report_leaves_bad_files_out_and_counts_them(copy):
    _, out = copy
    (out / "runs" / f"{STUDENT1}.json").write_bytes(truncated(out, STUDENT1))
    (out / "runs" / f"{KD0}.json").write_text('{"status": "ok"}')
    result = kdbench("report", out)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert lines[:2] == [
        f"warning: {out / 'runs' / f'{KD0}.json'}: not a RunResult: run_id: Field required; left out of the report",
        f"warning: {out / 'runs' / f'{STUDENT1}.json'}: " + SPOILS["truncated"][1] + lines[1].split(
            SPOILS["truncated"][1], 1)[1]]
    assert lines[1].endswith("; left out of the report")
    assert lines[2:] == [f"warning: 2 result file(s) in {out / 'runs'} left out of the report"]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in (out / "README.md").read_text().splitlines()
             if line.startswith("|")]
    seeds = {row[1]: row[3] for row in cells if row[0] == "pair" and row[1] != "variant"}
    # the student alone is left with seed 0 only, logit-kd with seed 1 only; the teacher row is whole
    assert seeds == {"teacher": "1", "student alone": "1", "logit-kd": "1"}, seeds


@pytest.mark.parametrize("kind", SPOILS)
def test_report_never_crashes_on_a_bad_file(copy, kind):
    _, out = copy
    spoil, _ = SPOILS[kind]
    (out / "runs" / f"{TEACHER}.json").write_bytes(spoil(out, TEACHER))
    result = kdbench("report", out)
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == f"warning: 1 result file(s) in {out / 'runs'} left out of the report"


def test_compare_names_a_bad_file_too(copy, finished):
    _, out = copy
    (out / "runs" / f"{TEACHER}.json").write_text("[1, 2]")
    result = kdbench("compare", finished[0], out)
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [f"warning: {out / 'runs' / f'{TEACHER}.json'}: not a RunResult: a JSON list "
                                          "instead of an object; left out of the comparison"]


def test_compare_says_where_it_wrote_and_refuses_an_unwritable_output(copy, finished, tmp_path):
    _, out = copy
    page = tmp_path / "cmp.md"
    result = kdbench("compare", finished[0], out, "-o", page)
    assert result.exit_code == 0 and page.read_text().strip() in result.stdout
    assert result.stderr.splitlines() == [f"written to {page}"]
    result = kdbench("compare", finished[0], out, "-o", tmp_path / "no" / "such" / "folder.md")
    assert result.exit_code == 2 and result.stderr.startswith(f"error: cannot write {tmp_path / 'no'}")
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------------------------
# A failed run never overwrites a finished result


def test_a_failed_rerun_keeps_the_finished_result(copy, monkeypatch):
    from kdbench.errors import KdbenchError
    from kdbench.methods import methods
    from kdbench.methods.logit import LogitKD

    class Broken(LogitKD):
        def loss(self, student_out, teacher_out, labels):
            raise KdbenchError("this method refuses to train")

    monkeypatch.setitem(methods._entries, "logit", Broken)
    suite, out = copy
    before = runs_of(out)
    result = kdbench("run", suite, "--rerun", "--only", KD0)
    assert result.exit_code == 2
    assert f"error: run {KD0} failed: this method refuses to train" in result.stderr.splitlines()
    assert runs_of(out)[KD0] == before[KD0]
    failed = json.loads((out / "runs" / "failed" / f"{KD0}.json").read_text())
    assert failed["status"] == "failed" and failed["error"] == "this method refuses to train"
