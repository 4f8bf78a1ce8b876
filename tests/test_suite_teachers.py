"""A pair's `teachers`: the schema, the runs it expands to, the hashes a one-teacher pair keeps, and each refusal
(one line, exit code 2 from `kdbench validate` and `kdbench run`)."""

import copy

import pytest
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.errors import KdbenchError
from kdbench.plan import expand
from kdbench.preflight import check_suite
from kdbench.suite import load_suite
from tiny import BERT, save_tiny_bart, tiny_suite_data, write_suite

TEACHER = {"model": {**BERT, "hidden_size": 16, "intermediate_size": 32}, "finetune": {"max_steps": 2}}
SMALL_TEACHER = {"model": {**BERT, "hidden_size": 8, "intermediate_size": 16}, "finetune": {"max_steps": 2}}
STUDENT = {"model": {**BERT, "hidden_size": 8, "intermediate_size": 16}}
KD = {"name": "kd", "method": "logit"}


def suite_data(tmp_path, pair: dict, methods=(KD,)) -> dict:
    return tiny_suite_data(tmp_path, tmp_path / "cache", list(methods), pairs=[{"name": "pair", **pair}])


def several(*teachers, **more) -> dict:
    return {"teachers": [copy.deepcopy(t) for t in teachers], "student": STUDENT, **more}


def one_line_error(tmp_path, data: dict, *fragments: str, preflight: bool = False) -> str:
    """The API refuses `data` in one line holding every fragment (at load, or with `preflight` at check_suite), and
    so do `kdbench validate` and `kdbench run`, with exit code 2."""
    path = write_suite(tmp_path, data, f"suite-{len(list(tmp_path.glob('suite-*.yaml')))}.yaml")
    with pytest.raises(KdbenchError) as info:
        suite = load_suite(path)
        if preflight:
            check_suite(suite)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    for command in ("validate", "run"):
        result = CliRunner().invoke(app, [command, str(path)])
        assert result.exit_code == 2, result.output
        assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
            f"error: {message}" if not preflight else f"error: {path}: {message}"], result.stderr
    assert not (tmp_path / "results").exists()  # refused before anything ran
    return message


def test_teachers_expand_to_a_teacher_run_each_and_a_one_teacher_pair_keeps_its_runs(tmp_path):
    multi = expand(load_suite(write_suite(tmp_path, suite_data(tmp_path, several(TEACHER, SMALL_TEACHER)), "a.yaml")))
    assert [r.run_id for r in multi] == ["sentiment__pair__teacher1", "sentiment__pair__teacher2",
                                         "sentiment__pair__student__s0", "sentiment__pair__kd__s0"]
    assert multi[0].spec_hash != multi[1].spec_hash
    single = expand(load_suite(write_suite(tmp_path, suite_data(tmp_path, {"teacher": TEACHER, "student": STUDENT}),
                                           "b.yaml")))
    assert [r.run_id for r in single][0] == "sentiment__pair__teacher"
    dumped = single[0].model_dump(mode="json")
    # nothing new in a one-teacher spec, so its hash (and its cached teacher's key) is what it was
    assert "teacher_index" in dumped and "teachers" not in dumped["pair"] and "teacher_average" not in dumped["pair"]
    assert single[0].teacher_index is None


def test_teacher_and_teachers_together_or_neither_are_refused(tmp_path):
    both = several(TEACHER, SMALL_TEACHER, teacher=TEACHER)
    one_line_error(tmp_path, suite_data(tmp_path, both), "pairs[0]", "give `teacher` or `teachers`, not both")
    one_line_error(tmp_path, suite_data(tmp_path, {"student": STUDENT}), "pairs[0]", "a pair needs `teacher`")
    one_line_error(tmp_path, suite_data(tmp_path, {"teacher": TEACHER, "student": STUDENT,
                                                   "teacher_average": "logits"}), "teacher_average is for")
    layered = {**several(TEACHER, SMALL_TEACHER), "student": {"from_teacher": {"layers": [0]}}}
    one_line_error(tmp_path, suite_data(tmp_path, layered), "student.from_teacher takes one teacher's layers")


def test_a_weight_that_is_not_positive_is_refused(tmp_path):
    for weight in (0, -1.5):
        one_line_error(tmp_path, suite_data(tmp_path, several(TEACHER, {**SMALL_TEACHER, "weight": weight})),
                       "pairs[0].teachers[1].weight", "greater than 0")


def test_a_feature_method_with_several_teachers_is_refused(tmp_path):
    methods = [KD, {"name": "feat", "method": "hidden"}]
    one_line_error(tmp_path, suite_data(tmp_path, several(TEACHER, SMALL_TEACHER), methods), "methods[1]",
                   "method 'feat' needs one teacher's hidden states", "pair 'pair' has 2 teachers")
    methods = [{"name": "att", "method": "attention"}]
    one_line_error(tmp_path, suite_data(tmp_path, several(TEACHER, SMALL_TEACHER), methods), "methods[0]",
                   "method 'att' needs one teacher's attention maps")


def test_teachers_with_different_vocabularies_are_refused(tmp_path):
    data = suite_data(tmp_path, several({**TEACHER, "model": {**TEACHER["model"], "vocab_size": 3000}},
                                        {**SMALL_TEACHER, "model": {**SMALL_TEACHER["model"], "vocab_size": 3001}}))
    one_line_error(tmp_path, data, "pairs.pair: teachers.0 vocab_size 3000 and teachers.1 vocab_size 3001 differ",
                   preflight=True)
    # two local models with tokenizers of their own (different texts, different vocabularies)
    first = save_tiny_bart(tmp_path / "bart-a", ["a good film", "a bad film"] * 4)
    second = save_tiny_bart(tmp_path / "bart-b", ["the sky is blue", "rain falls on the hills"] * 4)
    data = suite_data(tmp_path, several({"model": str(first)}, {"model": str(second)}))
    one_line_error(tmp_path, data, "pairs.pair:", f"teachers[0] '{first}' and teachers[1] '{second}' have "
                   "different vocabularies", preflight=True)


def test_teachers_with_different_label_sets_are_refused(tmp_path):
    labels = {0: "negative", 1: "positive"}
    data = suite_data(tmp_path, several({**TEACHER, "model": {**TEACHER["model"], "id2label": labels}},
                                        {**SMALL_TEACHER, "model": {**SMALL_TEACHER["model"],
                                                                    "id2label": {0: "positive", 1: "negative"}}}))
    one_line_error(tmp_path, data, "pairs.pair: teachers.0 and teachers.1 have different label sets", preflight=True)
    same = suite_data(tmp_path, several({**TEACHER, "model": {**TEACHER["model"], "id2label": labels}},
                                        {**SMALL_TEACHER, "model": {**SMALL_TEACHER["model"], "id2label": labels}}))
    check_suite(load_suite(write_suite(tmp_path, same, "same.yaml")))  # the same labels pass


def test_only_selects_every_teacher_run_a_student_needs(tmp_path):
    from kdbench.run.runner import select_runs

    suite = load_suite(write_suite(tmp_path, suite_data(tmp_path, several(TEACHER, SMALL_TEACHER))))
    assert select_runs(suite, ["*__kd__s0"]) == ["sentiment__pair__teacher1", "sentiment__pair__teacher2",
                                                 "sentiment__pair__kd__s0"]
