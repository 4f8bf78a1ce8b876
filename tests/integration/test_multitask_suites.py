"""Multitask suites: the suite section, the group's runs, an end-to-end run, and the group's student cached on disk."""

from pathlib import Path

import pytest
import yaml

from kdbench.errors import KdbenchError
from kdbench.results import read_result, run_path
from kdbench.run.runner import run_suite
from kdbench.plan import expand
from kdbench.suite import load_suite
from tiny import BERT, FAST_PROFILING


def topics_file(tmp_path: Path) -> Path:
    """A 3-label task in a local TSV: the topic word decides."""
    rows = [f"the {w} story was long\t{t}" for i in range(20)
            for w, t in (("match", "sport"), ("market", "business"), ("vote", "politics"))[i % 3: i % 3 + 1]]
    path = tmp_path / "topics.tsv"
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return path


def suite_data(tmp_path: Path, **overrides) -> dict:
    topics = topics_file(tmp_path)
    return {
        "name": "mt",
        "device": "cpu",
        "seeds": [0],
        "tasks": [{"name": "sentiment", "task": "generated_sentiment",
                   "params": {"train_size": 48, "transfer_size": 16, "eval_size": 16}},
                  {"name": "topics", "task": "text_classification",
                   "params": {"train_file": str(topics), "eval_file": str(topics), "text_column": "sentence"}}],
        "pairs": [{"name": "pair",
                   "teacher": {"model": {**BERT, "hidden_size": 16, "intermediate_size": 32},
                               "finetune": {"max_steps": 2, "batch_size": 16}},
                   "student": {"model": {**BERT, "hidden_size": 8, "intermediate_size": 16}}}],
        "methods": [{"name": "kd", "method": "logit", "params": {"temperature": 2.0}}],
        "multitask": [{"name": "mt-kd", "tasks": ["sentiment", "topics"], "method": "kd"}],
        "training": {"max_steps": 3, "batch_size": 16, "max_seq_length": 32},
        "profiling": FAST_PROFILING,
        "output_dir": str(tmp_path / "results"),
        "cache_dir": str(tmp_path / "cache"),
        **overrides,
    }


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("group, message", [
    ({"name": "g", "tasks": ["sentiment", "nope"], "method": "kd"},
     r"multitask\[0\]\.tasks\[1\]: unknown task 'nope'; the suite's tasks: sentiment, topics"),
    ({"name": "g", "tasks": ["sentiment", "topics"], "method": "nope"},
     r"multitask\[0\]\.method: unknown method 'nope'; the suite's methods: kd"),
    ({"name": "kd", "tasks": ["sentiment", "topics"], "method": "kd"},
     r"multitask\[0\]\.name: 'kd' is also a method's name"),
    ({"name": "g", "tasks": ["sentiment", "sentiment"], "method": "kd"},
     r"multitask\[0\]\.tasks: a task is listed twice"),
    ({"name": "g", "tasks": ["sentiment"], "method": "kd"}, r"multitask\[0\]\.tasks: .*at least 2"),
])
def test_bad_groups_are_named_with_their_line(tmp_path, group, message):
    path = write(tmp_path, suite_data(tmp_path, multitask=[group]))
    with pytest.raises(KdbenchError, match=rf"suite.yaml: line \d+: {message}"):
        load_suite(path)


def test_expand_puts_group_runs_last_and_gives_grouped_runs_their_group(tmp_path):
    suite = load_suite(write(tmp_path, suite_data(tmp_path)))
    runs = expand(suite)
    assert [r.run_id for r in runs][-2:] == ["sentiment__pair__mt-kd__s0", "topics__pair__mt-kd__s0"]
    assert all(r.kind != "multitask" for r in runs[:-2])
    assert {r.method.method for r in runs[-2:]} == {"logit"}
    assert all([t.name for t in r.group] == ["sentiment", "topics"] for r in runs)
    # without the group, the same runs have no group and other hashes (another tokenizer, so other teachers)
    alone = expand(load_suite(write(tmp_path, suite_data(tmp_path, multitask=[]))))
    assert [r.run_id for r in alone] == [r.run_id for r in runs[:-2]]
    assert all(not r.group for r in alone)
    assert all(a.spec_hash != b.spec_hash for a, b in zip(alone, runs))


def test_a_multitask_suite_runs_end_to_end(tmp_path):
    outcome = run_suite(load_suite(write(tmp_path, suite_data(tmp_path))), show_progress=False)
    assert {r.run_id: r.status for r in outcome.runs if r.status != "ok"} == {}
    out = outcome.results_dir
    results = {task: read_result(run_path(out, f"{task}__pair__mt-kd__s0")) for task in ("sentiment", "topics")}
    for task, result in results.items():
        [variant] = result["variants"]
        info = variant["multitask"]
        assert info["tasks"] == ["sentiment", "topics"] and variant["kind"] == "distilled"
        assert info["task_params"] == variant["params"] < info["group_params"] < 2 * variant["params"]
        assert 0.0 <= variant["metric"] <= 1.0 and variant["metric_name"] == "accuracy"
    # trained once for the group: the same training record in both tasks' results
    assert results["sentiment"]["training"] == results["topics"]["training"]
    readme = (out / "README.md").read_text()
    assert "- **mt-kd**: one student for the tasks sentiment, topics" in readme


def test_a_multitask_group_distils_on_what_its_method_trains_on(tmp_path):
    """The group's rows come from the same place as a single-task run's: sequence-level KD asks each task's
    teacher to decode, which a classification task cannot, and says so in one line."""
    data = suite_data(tmp_path, methods=[{"name": "seq", "method": "sequence"}],
                      multitask=[{"name": "mt-seq", "tasks": ["sentiment", "topics"], "method": "seq"}])
    outcome = run_suite(load_suite(write(tmp_path, data)), show_progress=False, only=[
        "sentiment__pair__teacher", "topics__pair__teacher", "sentiment__pair__mt-seq__s0"])
    [failed] = outcome.failed
    assert failed.error == ("method 'mt-seq': sequence-level KD needs a seq2seq or causal LM task; task 'sentiment' "
                            "has a classification head")


def test_a_trained_group_is_cached_on_disk_and_reused(tmp_path, monkeypatch):
    """A suite resumed half-way through a group (or re-run elsewhere) loads the group's student, not trains it."""
    from kdbench.run import group

    data = suite_data(tmp_path)
    only = ["sentiment__pair__teacher", "topics__pair__teacher", "sentiment__pair__mt-kd__s0"]
    first = run_suite(load_suite(write(tmp_path, data)), show_progress=False, only=only)
    assert {r.status for r in first.runs} == {"ok"}
    assert len(list((tmp_path / "cache" / "multitask").iterdir())) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the group was trained again")

    monkeypatch.setattr(group, "train_students", no_training)
    again = run_suite(load_suite(write(tmp_path, {**data, "output_dir": str(tmp_path / "elsewhere")})),
                      show_progress=False, only=only + ["topics__pair__mt-kd__s0"])
    assert {r.run_id: r.status for r in again.runs if r.status != "ok"} == {}
    before = read_result(run_path(first.results_dir, "sentiment__pair__mt-kd__s0"))
    after = read_result(run_path(again.results_dir, "sentiment__pair__mt-kd__s0"))
    assert after["variants"][0]["metric"] == before["variants"][0]["metric"]
    assert after["training"] == before["training"]
    # another seed is another group: not in the cache
    seeded = run_suite(load_suite(write(tmp_path, {**data, "seeds": [1], "output_dir": str(tmp_path / "s1")})),
                       show_progress=False, only=["sentiment__pair__teacher", "topics__pair__teacher",
                                                  "sentiment__pair__mt-kd__s1"])
    [failed] = seeded.failed
    assert "the group was trained again" in failed.error


def test_selecting_a_group_run_brings_every_teacher_of_its_group(tmp_path):
    from kdbench.run.runner import select_runs

    suite = load_suite(write(tmp_path, suite_data(tmp_path)))
    assert select_runs(suite, ["sentiment__pair__mt-kd__s0"]) == [
        "sentiment__pair__teacher", "topics__pair__teacher", "sentiment__pair__mt-kd__s0"]
    assert select_runs(suite, ["sentiment__pair__kd__s0"]) == ["sentiment__pair__teacher", "sentiment__pair__kd__s0"]
