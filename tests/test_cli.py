"""The `kdbench` command end to end: suites/smoke.yaml for real, and every bad input as one line with exit code 2.

The smoke suite is the only real training here: it runs once per session (plus a --rerun) inside this process,
through typer's CliRunner; `kdbench --help` is checked in a fresh interpreter.
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.compress import compressors
from kdbench.methods import methods
from kdbench.models import model_types, train_tokenizer
from kdbench.plan import expand
from kdbench.suite import load_suite
from kdbench.tasks import tasks

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "suites" / "smoke.yaml"




def kdbench(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a bug: show it
    return result


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def summary_lines(text: str) -> list[str]:
    """The console summary after a run: from the first task heading to the run counts."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("== "))
    end = next(i for i, line in enumerate(lines) if line.startswith("runs: "))
    return lines[start:end]


def runs_of(results_dir: Path) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in sorted((results_dir / "runs").glob("*.json"))}


def report_files_of(results_dir: Path) -> dict[str, bytes]:
    """The rendered report: README.md and the plots."""
    return {p.name: p.read_bytes() for p in [results_dir / "README.md", *sorted(results_dir.glob("*.png"))]}


# ---------------------------------------------------------------------------------------------------------------
# suites/smoke.yaml end to end


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run the smoke suite three times (fresh, again, --rerun) into a temporary folder; keep what each left."""
    tmp = tmp_path_factory.mktemp("smoke")
    data = yaml.safe_load(SMOKE.read_text())
    data.update(cache_dir=str(tmp / "cache"), output_dir=str(tmp / "unused"))
    suite_file = tmp / "smoke.yaml"
    suite_file.write_text(yaml.safe_dump(data, sort_keys=False))
    base = tmp / "results"
    out = base / data["name"]
    s = SimpleNamespace(suite_file=suite_file, base=base, out=out, specs=expand(load_suite(suite_file)))

    s.first = kdbench("run", suite_file, "--results-dir", base)
    s.first_runs, s.first_readme = runs_of(out), (out / "README.md").read_text()
    s.first_report = report_files_of(out)
    s.second = kdbench("run", suite_file, "--results-dir", base)
    s.second_runs, s.second_report = runs_of(out), report_files_of(out)
    s.dry = kdbench("run", suite_file, "--results-dir", base, "--dry-run")
    s.dry_rerun = kdbench("run", suite_file, "--results-dir", base, "--dry-run", "--rerun")
    s.rerun = kdbench("run", suite_file, "--results-dir", base, "--rerun")
    s.rerun_runs = runs_of(out)
    return s


def test_smoke_suite_is_tiny():
    suite = load_suite(SMOKE)
    assert len(suite.seeds) == 1 and len(suite.methods) == 1 and 1 <= len(suite.compression) <= 2
    assert suite.profiling.memory is False


def test_smoke_run_succeeds_and_prints_the_table(smoke):
    assert smoke.first.exit_code == 0, smoke.first.output
    assert error_lines(smoke.first) == []
    suite = load_suite(smoke.suite_file)
    rows = ["teacher", "student alone", suite.methods[0].name] + [
        f"{suite.methods[0].name} + {c.name}" for c in suite.compression]
    lines = smoke.first.stdout.splitlines()
    for row in rows:  # the narrow summary: one line per variant, starting with its name
        assert any(line.startswith(f"{row}  ") for line in lines), (row, smoke.first.stdout)
    assert "What should I ship?" in smoke.first.stdout and "- Best student: " in smoke.first.stdout
    assert max(map(len, lines)) <= 100, smoke.first.stdout
    assert f"full report and plots: " in smoke.first.stdout and "result JSONs: " in smoke.first.stdout
    assert f"runs: {len(smoke.specs)} ok, 0 failed, 0 already done" in smoke.first.stdout


def test_smoke_run_writes_one_result_per_run(smoke):
    assert sorted(smoke.first_runs) == sorted(spec.run_id for spec in smoke.specs)
    for spec in smoke.specs:
        record = json.loads(smoke.first_runs[spec.run_id])
        assert record["status"] == "ok" and record["error"] is None
        assert record["run_id"] == spec.run_id
        assert record["spec_hash"] == spec.spec_hash and record["spec"] == spec.model_dump(mode="json")
        assert {"kdbench", "torch", "transformers", "triton", "cuda", "python"} <= set(record["versions"])
        assert record["versions"]["torch"] == torch.__version__
        assert record["device"]["type"] == "cpu" and record["device"]["name"]
        variants = record["variants"]
        expected = 1 + (len(spec.compression) if spec.kind == "distill" else 0)
        assert len(variants) == expected
        for v in variants:
            assert 0.0 <= v["metric"] <= 1.0 and v["params"] > 0 and v["latency"]


def test_second_run_executes_nothing_and_keeps_results_byte_identical(smoke):
    assert smoke.second.exit_code == 0, smoke.second.output
    assert f"runs: 0 ok, 0 failed, {len(smoke.specs)} already done" in smoke.second.stdout
    assert smoke.second_runs == smoke.first_runs
    assert smoke.second_report == smoke.first_report  # the report is re-rendered to the same bytes
    assert any(name.endswith(".png") for name in smoke.first_report)
    assert summary_lines(smoke.second.stdout) == summary_lines(smoke.first.stdout)


def test_dry_run_lists_the_runs(smoke):
    assert smoke.dry.exit_code == 0
    assert smoke.dry.stdout.splitlines() == [f"done  {spec.run_id}" for spec in smoke.specs]
    assert smoke.dry_rerun.stdout.splitlines() == [f"run   {spec.run_id}" for spec in smoke.specs]


def test_only_runs_the_matching_runs_and_the_teachers_they_need(tmp_path):
    data = yaml.safe_load(SMOKE.read_text())
    data.update(cache_dir=str(tmp_path / "cache"))
    suite_file = tmp_path / "smoke.yaml"
    suite_file.write_text(yaml.safe_dump(data, sort_keys=False))
    ids = [spec.run_id for spec in expand(load_suite(suite_file))]
    student = next(i for i in ids if i.endswith("__student__s0"))
    teacher = next(i for i in ids if i.endswith("__teacher"))
    dry = kdbench("run", suite_file, "--results-dir", tmp_path, "--dry-run", "--only", "*__student__s*")
    assert dry.exit_code == 0 and dry.stdout.splitlines() == [f"run   {teacher}", f"run   {student}"]
    result = kdbench("run", suite_file, "--results-dir", tmp_path, "--only", "*__student__s*", "-v")
    assert result.exit_code == 0, result.output
    # -v: a line per run and per measured variant, for logs where no progress bar is drawn
    logged = " ".join(result.stderr.split())
    for line in (f"{teacher}: running", f"{teacher}: measuring teacher", f"{student}: measuring student",
                 f"{student}: ok in"):
        assert line in logged, line
    assert sorted(p.stem for p in (tmp_path / "smoke" / "runs").glob("*.json")) == sorted([teacher, student])
    none = kdbench("run", suite_file, "--results-dir", tmp_path, "--only", "sst2__*")
    assert none.exit_code == 2
    assert none.stderr.strip() == (f"error: --only sst2__*: no run matches; run ids look like {teacher} "
                                   "(`kdbench run --dry-run` lists them)")


def test_dry_run_before_any_run(tmp_path):
    result = kdbench("run", SMOKE, "--results-dir", tmp_path, "--dry-run")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [f"run   {spec.run_id}" for spec in expand(load_suite(SMOKE))]
    assert not (tmp_path / "smoke").exists()


def test_rerun_executes_every_run_again(smoke):
    assert smoke.rerun.exit_code == 0, smoke.rerun.output
    assert f"runs: {len(smoke.specs)} ok, 0 failed, 0 already done" in smoke.rerun.stdout
    assert sorted(smoke.rerun_runs) == sorted(smoke.first_runs)
    for run_id, blob in smoke.rerun_runs.items():
        before, after = json.loads(smoke.first_runs[run_id]), json.loads(blob)
        assert after["status"] == "ok" and after["spec_hash"] == before["spec_hash"]
        assert blob != smoke.first_runs[run_id]  # written again (fresh timings)


def test_report_re_renders_from_the_results(smoke):
    readme = smoke.out / "README.md"
    readme.unlink()
    result = kdbench("report", smoke.out)
    assert result.exit_code == 0
    assert readme.is_file()
    assert f"written to {readme}" in " ".join(result.stderr.split())
    assert table_lines(result.stdout)
    assert set(table_lines(result.stdout)) <= set(readme.read_text().splitlines())
    assert "What should I ship?" in "\n".join(summary_lines(smoke.rerun.stdout))


def test_report_on_a_folder_without_results(tmp_path):
    result = kdbench("report", tmp_path)
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: no results in {tmp_path} (expected {tmp_path / 'runs'})"]


# ---------------------------------------------------------------------------------------------------------------
# ls, --help


@pytest.mark.parametrize("what, registry", [("tasks", tasks), ("methods", methods), ("compressors", compressors),
                                            ("models", model_types)])
def test_ls_lists_every_entry(what, registry):
    result = kdbench("ls", what)
    assert result.exit_code == 0
    entries = {}  # name -> its description, rejoined from the wrapped lines (parameter lines are indented more)
    for line in result.stdout.splitlines():
        if line and not line.startswith(" "):
            name, text = line.split(None, 1)
            entries[name] = text
        elif line.startswith(" " * 27) and not line.startswith(" " * 28):
            entries[name] += " " + line.strip()
    assert list(entries) == registry.names()
    # Each entry says what it is: the whole first paragraph of its docstring, never cut mid-sentence.
    assert all(text == registry.describe(name) for name, text in entries.items()), entries
    assert all(len(line) <= 100 for line in result.stdout.splitlines())


def test_ls_models_names_the_config_classes():
    result = kdbench("ls", "models")
    assert result.stdout.split() == ["bert", "BertConfig", "distilbert", "DistilBertConfig", "gpt2", "GPT2Config",
                                     "llama", "LlamaConfig", "roberta", "RobertaConfig", "t5", "T5Config"]


def test_ls_shows_params():
    result = kdbench("ls", "methods")
    # each parameter with its type and default, from the method's pydantic schema
    for line in ["temperature: float = 4.0", "alpha: float = 0.7", "divergence: forward_kl | reverse_kl | jsd = "
                 "'forward_kl'", "teacher_top_k: int | None = None",
                 # a nested schema by its keys, not its class path; a generic with its parameters
                 "weights: {ce, soft, hidden, attention} | None = None", "layer_map: dict[int, int] | None = None",
                 "feature_loss: mse | cosine = 'mse'", "attention_loss: mse | kl = 'mse'"]:
        assert line in result.stdout
    assert "kdbench.methods" not in result.stdout


def test_ls_unknown_registry_is_a_usage_error():
    result = kdbench("ls", "kernels")
    assert result.exit_code == 2
    assert "kernels" in result.stderr


def test_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; import kdbench.cli; "
            "r = CliRunner().invoke(kdbench.cli.app, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'run' in r.stdout and 'validate' in r.stdout; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'triton', 'datasets') if m in sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_suite_file_in_a_real_process(tmp_path):
    """The installed entry point: one line on stderr, exit code 2, nothing heavy imported on the way."""
    missing = tmp_path / "nope.yaml"
    proc = subprocess.run([sys.executable, "-m", "kdbench.cli", "run", str(missing)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: suite file not found: {missing}"]
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------------------------------------
# Bad input: refused before any run when it can be checked without training (kdbench.preflight), else the
# failing run is recorded; either way its error is one line, exit code 2



def bad_suite(tmp_path: Path, *, task: dict | None = None, teacher=None, student=None) -> Path:
    """The smoke suite with one thing swapped for a bad one, writing into tmp_path."""
    data = yaml.safe_load(SMOKE.read_text())
    data.update(output_dir=str(tmp_path / "results"), cache_dir=str(tmp_path / "cache"))
    if task is not None:
        data["tasks"][0] = {"name": "local", "task": "text_classification", "params": task}
    if teacher is not None:
        data["pairs"][0]["teacher"] = {"model": teacher}
    if student is not None:
        data["pairs"][0]["student"] = {"model": student}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_tsv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_run_fails(path: Path, culprit: str):
    """The teacher run fails naming the culprit; its students fail because of it; every failure is one line."""
    result = kdbench("run", path)
    assert result.exit_code == 2, result.output
    suite = load_suite(path)
    teacher_id = expand(suite)[0].run_id
    errors = error_lines(result)
    assert errors[0] == f"error: run {teacher_id} failed: {culprit}", result.stderr
    assert all("did not succeed" in e for e in errors[1:]) and len(errors) == len(expand(suite))
    assert "Traceback" not in result.output
    assert "did not succeed" not in result.stdout  # stdout carries tables and the summary, never log lines
    out = Path(suite.output_dir) / suite.name
    record = json.loads((out / "runs" / f"{teacher_id}.json").read_text())
    assert record["status"] == "failed" and record["error"] == culprit and record["error_kind"] == "input"
    return result


def assert_refused_before_running(path: Path, culprit: str):
    """Preflight: `run` refuses the suite in one line naming it and the culprit; no run starts, none is recorded."""
    result = kdbench("run", path)
    assert result.exit_code == 2, result.output
    assert error_lines(result) == [f"error: {path}: {culprit}"], result.stderr
    assert "Traceback" not in result.output
    suite = load_suite(path)
    assert not (Path(suite.output_dir) / suite.name / "runs").exists()
    return result


def test_missing_local_data_file(tmp_path):
    missing = tmp_path / "data" / "train.tsv"
    path = bad_suite(tmp_path, task={"train_file": str(missing), "eval_file": str(missing)})
    assert_refused_before_running(path, f"tasks.local: task data file not found: {missing}")


def test_local_data_file_lacking_the_named_columns(tmp_path):
    data = write_tsv(tmp_path / "train.tsv", ["sentence\tlabel", "good\tpos", "bad\tneg"])
    path = bad_suite(tmp_path, task={"train_file": str(data), "eval_file": str(data)})
    assert_refused_before_running(path, f"tasks.local: {data}: no column 'text'; columns are: sentence, label")


def test_label_column_with_unexpected_values(tmp_path):
    data = write_tsv(tmp_path / "train.tsv", ["text\tlabel", "good\tpos", "bad\tneg", "meh\tneutral"])
    task = {"train_file": str(data), "eval_file": str(data), "labels": ["neg", "pos"]}
    assert_refused_before_running(bad_suite(tmp_path, task=task), f"tasks.local: {data}: train label 'neutral' is not "
                                                                  "one of the task's labels: neg, pos")


def test_hub_model_that_cannot_be_reached_offline(tmp_path, no_network):
    name = "kdbench-tests/no-such-model"
    path = bad_suite(tmp_path, teacher=name)
    assert_run_fails(path, f"model {name!r} is not a local folder and cannot be fetched from the hub "
                           "(needs a network, or give a local path)")


def test_teacher_and_student_with_different_vocabularies(tmp_path):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    t = train_tokenizer(["the plot was good", "the acting was bad"] * 3, 60, teacher_dir)
    s = train_tokenizer(["an entirely different corpus", "with other words"] * 3, 60, student_dir)
    path = bad_suite(tmp_path, teacher=str(teacher_dir), student=str(student_dir))
    assert_refused_before_running(path, f"pairs.bert-1L32-to-1L16: teacher '{teacher_dir}' and student "
                                        f"'{student_dir}' have different vocabularies ({len(t)} vs {len(s)} tokens); "
                                        "logit distillation needs a shared tokenizer")


def test_nan_loss_fails_its_run_and_the_suite_goes_on(tmp_path, monkeypatch):
    """A method whose loss is NaN: its run is recorded as failed, the runs before and after it finish."""
    from kdbench.methods.logit import LogitKD

    class NanKD(LogitKD):
        def loss(self, student_out, teacher_out, labels):
            return super().loss(student_out, teacher_out, labels) * float("nan")

    monkeypatch.setitem(methods._entries, "nan_loss", NanKD)
    data = yaml.safe_load(SMOKE.read_text())
    data.update(output_dir=str(tmp_path / "results"), cache_dir=str(tmp_path / "cache"), compression=[],
                methods=[{"name": "nan", "method": "nan_loss"}, *data["methods"]])
    data["training"]["max_steps"] = 2
    data["pairs"][0]["teacher"]["finetune"] = {"max_steps": 2}
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))

    result = kdbench("run", path)
    assert result.exit_code == 2, result.output
    nan_id = next(s.run_id for s in expand(load_suite(path)) if s.method and s.method.name == "nan")
    assert error_lines(result) == [f"error: run {nan_id} failed: loss is nan at step 1; run stopped"]
    assert f"runs: {len(expand(load_suite(path))) - 1} ok, 1 failed, 0 already done" in result.stdout
    runs = {k: json.loads(v) for k, v in runs_of(tmp_path / "results" / data["name"]).items()}
    assert {k: r["status"] for k, r in runs.items()} == {
        s.run_id: "failed" if s.run_id == nan_id else "ok" for s in expand(load_suite(path))}
