"""Tiny seq2seq suites scored by generation: exact match with sequence-level KD, one-line refusals of settings
a task cannot serve, and BART pairs (their own decoder start and target prefix) end to end."""

import pytest
import yaml

from kdbench import heads, models
from kdbench.errors import KdbenchError
from kdbench.results import read_result, run_path
from kdbench.run.runner import run_suite
from kdbench.suite import load_suite
from kdbench.tasks import load_task
from tiny import FAST_PROFILING, T5, save_tiny_bart, save_tiny_bart_pair


@pytest.fixture(scope="module")
def data():
    return load_task("generated_seq2seq", {"train_size": 40, "eval_size": 10})


def tiny_suite(tmp_path, task_params, methods, task="generated_seq2seq", teacher=None, student=None,
               training=None):
    data = {
        "name": "tiny-t5-gen", "device": "cpu", "seeds": [0],
        "tasks": [{"name": "s2s", "task": task, "params": {"train_size": 48, "eval_size": 12, **task_params}}],
        "pairs": [{"name": "t5",
                   "teacher": {"model": teacher or {**T5, "d_model": 16, "d_ff": 32},
                               "finetune": {"max_steps": 2, "batch_size": 8}},
                   "student": {"model": student or {**T5, "d_model": 8, "d_ff": 16}}}],
        "methods": methods,
        "training": {"batch_size": 8, "max_seq_length": 32, **(training or {"max_steps": 2})},
        "profiling": {**FAST_PROFILING, "seq_length": 24, "generate_tokens": 3},
        "output_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return load_suite(tmp_path / "suite.yaml")


def test_a_suite_scored_by_exact_match_with_sequence_level_kd(tmp_path):
    suite = tiny_suite(tmp_path, {"metric": "exact_match", "max_new_tokens": 12},
                       [{"name": "seq-kd", "method": "sequence", "params": {"alpha": 0.5, "max_new_tokens": 10}},
                        {"name": "seq-kd-refs", "method": "sequence", "params": {"keep_references": True}}],
                       training={"epochs": 1})
    outcome = run_suite(suite, show_progress=False)
    assert {r.run_id.split("__", 2)[2]: r.status for r in outcome.runs} == {
        "teacher": "ok", "student__s0": "ok", "seq-kd__s0": "ok", "seq-kd-refs__s0": "ok"}, [
        r.error for r in outcome.runs]
    out = outcome.results_dir
    for run in ("teacher", "student__s0", "seq-kd__s0"):
        [v] = read_result(run_path(out, f"s2s__t5__{run}"))["variants"]
        assert v["metric_name"] == "exact match" and v["higher_is_better"] is True and 0.0 <= v["metric"] <= 1.0
        assert 1.0 < v["extra_metrics"]["perplexity"] < float("inf")
        # decoding latency after the source at the profiling length (an encoder-decoder's source is not cut)
        assert [(g["prompt_tokens"], g["new_tokens"]) for g in v["generation"].values()] == [(24, 3)]
    # one epoch over the teacher's outputs: as many rows as the train split; with the gold pairs too, twice as many
    seq, refs = (read_result(run_path(out, f"s2s__t5__{m}__s0"))["training"] for m in ("seq-kd", "seq-kd-refs"))
    assert (seq["samples"], refs["samples"]) == (48, 96)
    readme = (out / "README.md").read_text()
    header = next(line for line in readme.splitlines() if line.startswith("| pair"))
    assert [c.strip() for c in header.split("|")][5:8] == ["exact match", "retention", "perplexity"]


def test_sequence_level_kd_refuses_a_task_without_decoding_in_one_line(tmp_path):
    from tiny import BERT

    suite = tiny_suite(tmp_path, {"transfer_size": 0}, [{"name": "seq-kd", "method": "sequence"}],
                       task="generated_sentiment", teacher={**BERT, "hidden_size": 16, "intermediate_size": 32},
                       student={**BERT, "hidden_size": 8, "intermediate_size": 16})
    outcome = run_suite(suite, show_progress=False)
    [failed] = outcome.failed
    assert failed.error == ("method 'seq-kd': sequence-level KD needs a seq2seq or causal LM task; task 's2s' has a "
                            "classification head") and failed.error_kind == "input"
    assert outcome.exit_code == 2


def test_a_prompt_length_on_a_seq2seq_task_is_refused_in_one_line(tmp_path):
    suite = tiny_suite(tmp_path, {}, [{"name": "seq-kd", "method": "sequence", "params": {"prompt_length": 4}}])
    outcome = run_suite(suite, show_progress=False)
    [failed] = outcome.failed
    assert failed.error == ("method 'seq-kd': prompt_length is for causal LM tasks; task 's2s' has a seq2seq "
                            "head") and failed.error_kind == "input"


@pytest.fixture(scope="module")
def barts(data, tmp_path_factory):
    return save_tiny_bart_pair(tmp_path_factory.mktemp("bart"), heads.get("seq2seq").texts(data.train))


def test_a_pair_whose_decoder_starts_differ_is_refused_in_one_line(data, barts, tmp_path):
    teacher, _ = barts
    odd = str(save_tiny_bart(tmp_path / "odd", heads.get("seq2seq").texts(data.train), d_model=8, decoder_start=1))
    message = ("pair 't5': the teacher starts its decoder with token 2, the student with 1; they are given the same "
               "decoder inputs, so the two must agree")
    with pytest.raises(KdbenchError) as info:
        heads.get("seq2seq").pair_options(teacher, odd, models.load_tokenizer(teacher), "t5")
    assert str(info.value) == message
    # and the runner asks before it trains anything
    outcome = run_suite(tiny_suite(tmp_path, {}, [], teacher=teacher, student=odd), show_progress=False)
    teacher_run, student_run = outcome.failed
    assert teacher_run.error == message and teacher_run.error_kind == "input"
    assert student_run.error == "teacher run s2s__t5__teacher did not succeed; its students cannot run"


def test_a_bart_pair_runs_a_suite_with_generation_metrics_and_sequence_level_kd(barts, tmp_path):
    teacher, student = barts
    suite = tiny_suite(tmp_path, {"metric": "exact_match", "max_new_tokens": 8},
                       [{"name": "kd", "method": "logit", "params": {"temperature": 2.0}},
                        {"name": "seq-kd", "method": "sequence", "params": {"max_new_tokens": 8}},
                        {"name": "prog", "method": "progressive"}],
                       teacher=teacher, student=student)
    outcome = run_suite(suite, show_progress=False)
    assert {r.run_id.split("__", 2)[2]: r.status for r in outcome.runs} == {
        "teacher": "ok", "student__s0": "ok", "kd__s0": "ok", "seq-kd__s0": "ok", "prog__s0": "ok"}, [
        r.error for r in outcome.runs]
    for run in ("teacher", "kd__s0", "seq-kd__s0"):
        [v] = read_result(run_path(outcome.results_dir, f"s2s__t5__{run}"))["variants"]
        assert v["metric_name"] == "exact match" and 0.0 <= v["metric"] <= 1.0
        assert 1.0 < v["extra_metrics"]["perplexity"] < float("inf") and v["generation"]
