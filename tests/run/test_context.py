"""The per-process Context: every student gets the teacher of the teacher run, and cached teachers and tokenizers
follow the data, not only the spec."""

import pytest

from kdbench import models
from kdbench.results import read_result, run_path
from kdbench.run.context import Context
from kdbench.run.runner import run_suite
from kdbench.plan import expand
from tiny import tiny_suite


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Shared by the tests of this file: the teacher is fine-tuned once and loaded from here afterwards."""
    return tmp_path_factory.mktemp("cache")


KD = {"name": "kd", "method": "logit", "params": {"temperature": 2.0}}


def test_every_student_gets_the_teacher_of_the_teacher_run(tmp_path, cache_dir):
    """A resumed suite may first ask for the teacher from a later seed's run: it must be the same teacher (the one
    fine-tuned with the suite's first seed, whose accuracy the teacher run recorded), not a new one."""
    suite = tiny_suite(tmp_path, cache_dir, [{"name": "kd", "method": "logit"}], seeds=[3, 5])
    specs = expand(suite)
    ctx = Context(suite, tmp_path / "results", "cpu")
    teacher_spec = next(s for s in specs if s.kind == "teacher")
    late_student = next(s for s in specs if s.kind == "distill" and s.seed == 5)
    assert teacher_spec.seed == 3
    assert ctx.teacher_key(late_student) == ctx.teacher_key(teacher_spec)
    model, _ = ctx.teacher(late_student)  # built first from seed 5's run, as after a resume
    vocab = len(ctx.tokenizer(late_student))
    reference = models.build_model(suite.pairs[0].teacher.model, num_labels=2, vocab_size=vocab, seed=3)
    other = models.build_model(suite.pairs[0].teacher.model, num_labels=2, vocab_size=vocab, seed=5)
    # fine-tuning ran 2 steps from the seed-3 initialisation: the classifier moved little from seed 3's, far from 5's
    w = model.classifier.weight.detach().cpu()
    assert (w - reference.classifier.weight).abs().max() < (w - other.classifier.weight).abs().max()


def test_cached_teachers_and_tokenizers_follow_the_data_not_only_the_spec(tmp_path, cache_dir):
    """The same task spec over other rows (an edited file, a changed generator) must not reuse a cached teacher."""
    data = tmp_path / "train.tsv"
    task = {"name": "local", "task": "text_classification",
            "params": {"train_file": str(data), "eval_file": str(data), "text_column": "sentence"}}
    keys = []
    for rows in (["a good film\t1", "a bad film\t0"], ["a good film\t1", "a dull film\t0"]):
        data.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
        suite = tiny_suite(tmp_path, cache_dir, [KD], tasks=[task])
        spec = expand(suite)[0]
        ctx = Context(suite, tmp_path / "results", "cpu")
        keys.append((ctx.tokenizer_key(spec), ctx.teacher_key(spec), spec.spec_hash))
    assert keys[0][0] != keys[1][0] and keys[0][1] != keys[1][1]
    assert keys[0][2] == keys[1][2]  # the run's own spec is unchanged: only the caches below it follow the data


def test_a_cached_teacher_reports_the_fine_tuning_that_made_it(tmp_path):
    """A teacher loaded from the cache (another results folder, a re-run) still shows its fine-tuning's stats."""
    cache = tmp_path / "cache"
    first = run_suite(tiny_suite(tmp_path, cache, []), show_progress=False)
    second = run_suite(tiny_suite(tmp_path, cache, [], output_dir=str(tmp_path / "elsewhere")), show_progress=False)
    trained, loaded = (read_result(run_path(o.results_dir, "sentiment__pair__teacher")) for o in (first, second))
    assert trained["training"]["steps"] == 2 and trained["training"]["wall_s"] > 0
    assert loaded["training"] == trained["training"]
