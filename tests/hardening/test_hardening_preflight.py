"""Preflight (issue 14): what `kdbench validate` checks without training, and `kdbench run` before its first run.

Each bad input is one `error:` line naming the culprit, exit code 2, from `validate` and from `run`; the run leaves
nothing behind: no result, no trained teacher.
"""

import os
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.models import train_tokenizer

SMOKE = Path(__file__).resolve().parents[2] / "suites" / "smoke.yaml"
BERT = {"model_type": "bert", "num_hidden_layers": 1, "max_position_embeddings": 32}


def kdbench(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def suite_file(tmp_path: Path, *, task=None, teacher=None, student=None, **top) -> Path:
    """suites/smoke.yaml writing into tmp_path, with the task, a model or top-level keys swapped."""
    data = yaml.safe_load(SMOKE.read_text())
    data.update(output_dir=str(tmp_path / "results"), cache_dir=str(tmp_path / "cache"))
    if task is not None:
        data["tasks"][0] = {"name": "local", "task": "text_classification", "params": task}
    if teacher is not None:
        data["pairs"][0]["teacher"]["model"] = teacher
    if student is not None:
        data["pairs"][0]["student"]["model"] = student
    data.update(top)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_tsv(path: Path, rows: list[str], header: str = "text\tlabel") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def refused_before_any_work(path: Path, culprit: str, *, results: Path | None = None, cache: Path | None = None):
    """`validate` and `run` both print `error: <suite>: <culprit>` alone and exit 2; the run wrote nothing at all:
    no result, no trained teacher, no folder."""
    for command in ("validate", "run"):
        result = kdbench(command, path)
        assert result.exit_code == 2, (command, result.output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: {path}: {culprit}"], (command, result.stderr)
        assert "Traceback" not in result.output and "bug" not in result.output
    data = yaml.safe_load(path.read_text())
    results, cache = results or Path(data["output_dir"]), cache or Path(data["cache_dir"])
    assert not results.exists() and not cache.exists()  # not even an empty folder


# ---------------------------------------------------------------------------------------------------------------
# Inline model configs


def test_heads_that_do_not_divide_the_width(tmp_path):
    path = suite_file(tmp_path, teacher={**BERT, "hidden_size": 10, "num_attention_heads": 3,
                                         "intermediate_size": 20})
    refused_before_any_work(path, "pairs.bert-1L32-to-1L16.teacher.model: hidden_size 10 is not divisible by "
                                  "num_attention_heads 3")


def test_key_value_heads_that_do_not_divide_the_heads(tmp_path):
    llama = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32,
             "num_attention_heads": 4, "num_key_value_heads": 3}
    path = suite_file(tmp_path, student=llama)
    refused_before_any_work(path, "pairs.bert-1L32-to-1L16.student.model: num_attention_heads 4 is not divisible "
                                  "by num_key_value_heads 3")


def test_a_config_its_model_cannot_be_built_from(tmp_path):
    """Built on the meta device: whatever the model's constructor refuses is refused, without any weights."""
    path = suite_file(tmp_path, student={**BERT, "hidden_size": 16, "num_attention_heads": 2,
                                         "intermediate_size": 32, "hidden_act": "no_such_activation"})
    result = kdbench("validate", path)
    assert result.exit_code == 2
    (error,) = result.stderr.splitlines()
    assert error.startswith(f"error: {path}: pairs.bert-1L32-to-1L16.student.model: cannot build this bert model: ")
    assert "no_such_activation" in error


def test_a_vocab_size_smaller_than_the_tokenizer(tmp_path):
    path = suite_file(tmp_path, student={**BERT, "hidden_size": 16, "num_attention_heads": 2,
                                         "intermediate_size": 32, "vocab_size": 10})
    result = kdbench("validate", path)
    assert result.exit_code == 2
    (error,) = result.stderr.splitlines()
    found = re.fullmatch(rf"error: {re.escape(str(path))}: pairs.bert-1L32-to-1L16.student: vocab_size 10 is "
                         r"smaller than the pair's tokenizer \((\d+) tokens\); remove vocab_size to use the "
                         "tokenizer's", error)
    assert found and int(found.group(1)) > 10, error
    refused_before_any_work(path, error.split(f"{path}: ", 1)[1])


def test_teacher_and_student_vocab_sizes_that_differ(tmp_path):
    path = suite_file(tmp_path, teacher={**BERT, "hidden_size": 32, "num_attention_heads": 2,
                                         "intermediate_size": 64, "vocab_size": 5000})
    result = kdbench("validate", path)
    assert result.exit_code == 2
    (error,) = result.stderr.splitlines()
    assert re.fullmatch(rf"error: {re.escape(str(path))}: pairs.bert-1L32-to-1L16: teacher vocab_size 5000 and "
                        r"student vocab_size \d+ differ; logit distillation needs one vocabulary", error), error


def test_inline_partner_of_a_local_pretrained_model_with_another_vocab_size(tmp_path):
    teacher_dir = tmp_path / "teacher"
    tok = train_tokenizer(["the plot was good", "the acting was bad"] * 3, 60, teacher_dir)
    student = {**BERT, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
               "vocab_size": len(tok) + 7}
    path = suite_file(tmp_path, teacher=str(teacher_dir), student=student)
    refused_before_any_work(path, f"pairs.bert-1L32-to-1L16: student vocab_size {len(tok) + 7} differs from the "
                                  f"pair's tokenizer ({len(tok)} tokens)")


# ---------------------------------------------------------------------------------------------------------------
# Data files: exist, have the named columns, and both splits carry the task's labels


def test_a_missing_eval_file(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", ["good\tpos", "bad\tneg"])
    missing = tmp_path / "eval.tsv"
    path = suite_file(tmp_path, task={"train_file": str(train), "eval_file": str(missing)})
    refused_before_any_work(path, f"tasks.local: task data file not found: {missing}")


def test_a_wrong_label_column(tmp_path):
    data = write_tsv(tmp_path / "train.tsv", ["good\tpos", "bad\tneg"])
    path = suite_file(tmp_path, task={"train_file": str(data), "eval_file": str(data), "label_column": "sentiment"})
    refused_before_any_work(path, f"tasks.local: {data}: no column 'sentiment'; columns are: text, label")


def test_a_csv_file_and_a_json_lines_file_are_read_by_their_header(tmp_path):
    csv_file = tmp_path / "train.csv"
    csv_file.write_text('text,label\n"good, really",pos\nbad,neg\n')
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    ok = suite_file(tmp_path, task={"train_file": str(csv_file), "eval_file": str(jsonl)})
    assert kdbench("validate", ok).exit_code == 0
    bad = suite_file(tmp_path, task={"train_file": str(csv_file), "eval_file": str(jsonl), "text_column": "review"})
    result = kdbench("validate", bad)
    assert result.stderr.splitlines() == [f"error: {bad}: tasks.local: {csv_file}: no column 'review'; columns "
                                          "are: text, label"]


def test_an_eval_label_that_is_not_one_of_the_tasks_labels(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", ["good\tpos", "bad\tneg"])
    eval_ = write_tsv(tmp_path / "eval.tsv", ["fine\tpos", "awful\tnegative"])
    task = {"train_file": str(train), "eval_file": str(eval_), "labels": ["neg", "pos"]}
    refused_before_any_work(suite_file(tmp_path, task=task),
                            f"tasks.local: {eval_}: eval label 'negative' is not one of the task's labels: neg, pos")


def test_a_stray_train_label_does_not_become_a_class(tmp_path):
    """Without `labels`, the classes are the train split's values: one the eval split never has is refused."""
    train = write_tsv(tmp_path / "train.tsv", ["good\tpos", "bad\tneg", "great\tPOS"])
    eval_ = write_tsv(tmp_path / "eval.tsv", ["fine\tpos", "awful\tneg"])
    task = {"train_file": str(train), "eval_file": str(eval_)}
    refused_before_any_work(suite_file(tmp_path, task=task),
                            f"tasks.local: {train}: train label 'POS' never occurs in the eval split {eval_}; if it is "
                            "one of the task's labels, list them all in params.labels")


def test_integer_label_ids_index_the_label_names(tmp_path):
    """As kdbench.tasks reads them: a column of whole numbers holds indices into `labels`."""
    train = write_tsv(tmp_path / "train.tsv", ["good\t1", "bad\t0"])
    task = {"train_file": str(train), "eval_file": str(train), "labels": ["neg", "pos"]}
    assert kdbench("validate", suite_file(tmp_path, task=task)).exit_code == 0
    task["labels"] = ["only"]
    result = kdbench("validate", suite_file(tmp_path, task=task))
    assert result.exit_code == 2 and "train label '1' is not one of the task's labels: only" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Folders: writable before anything trains


def test_an_unwritable_results_folder_stops_the_run_before_the_teacher_trains(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the results folder should be")
    path = suite_file(tmp_path, output_dir=str(blocker / "results"))
    result = kdbench("run", path)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: {path}: results folder {blocker / 'results' / 'smoke'} is not "
                                          "writable: Not a directory"]
    assert not (tmp_path / "cache" / "teachers").exists()


def test_an_unwritable_cache_folder_is_bad_input_not_a_bug(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    path = suite_file(tmp_path, cache_dir=str(blocker / "cache"))
    result = kdbench("run", path)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: {path}: cache folder {blocker / 'cache'} is not writable: "
                                          "Not a directory"]
    assert not list((tmp_path / "results").glob("*/runs/*.json"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_results_folder(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o555)
    try:
        result = kdbench("run", suite_file(tmp_path))
    finally:
        results.chmod(0o755)
    assert result.exit_code == 2 and "is not writable: Permission denied" in result.stderr


def test_validate_writes_nothing(tmp_path):
    path = suite_file(tmp_path)
    assert kdbench("validate", path).exit_code == 0
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------------------------
# Input errors are exit 2; a bug of kdbench's own is exit 1, one line, its traceback with -v


def test_a_bug_before_any_run_is_one_line_and_exit_1_with_the_traceback_under_v(tmp_path, monkeypatch):
    import kdbench.preflight

    def broken(*args, **kwargs):
        raise RuntimeError("an internal mistake")

    monkeypatch.setattr(kdbench.preflight, "check_suite", broken)
    path = suite_file(tmp_path)
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["error: bug in kdbench: RuntimeError: an internal mistake (-v shows the "
                                          "traceback)"]
    verbose = CliRunner().invoke(app, ["run", str(path), "-v"])
    assert isinstance(verbose.exception, RuntimeError) and verbose.exc_info[2] is not None
