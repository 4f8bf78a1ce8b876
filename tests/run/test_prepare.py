"""Preparing a method's training (kdbench.run.prepare): the runner asks the objective what it needs and serves it for
the task's head. The methods here are defined in this file, outside kdbench: none needs a change to the runner."""

import pytest

from kdbench.errors import KdbenchError
from kdbench.methods import methods
from kdbench.methods.base import Decoding
from kdbench.methods.logit import LogitKD
from kdbench.results import read_result, run_path
from kdbench.run.context import Context
from kdbench.run.prepare import check_and_bind, distiller, distillation_rows
from kdbench.run.runner import run_suite
from kdbench.plan import expand
from tiny import LM_PAIR, LM_TASK, tiny_suite


class EveryOtherRow(LogitKD):
    """Trains on every other row of the data."""

    def training_rows(self, rows, teacher_decoded):
        return rows[::2]


class WritesItsOwn(LogitKD):
    """Asks for the student to write its batches, and keeps what it is bound to."""

    bound = None
    prompt_length = 8

    @property
    def student_decoding(self):
        return Decoding("self-written KD", max_new_tokens=4, prompt_length=self.prompt_length)

    def bind(self, write, collate, seed):
        self.bound = (write, collate, seed)


class DecodedByTheTeacher(LogitKD):
    @property
    def teacher_decoding(self):
        return Decoding("teacher-written KD")


class ReadsTheTeacherEveryStep(LogitKD):
    teacher_logits_suffice = False


def first_distill(tmp_path, **overrides):
    suite = tiny_suite(tmp_path, tmp_path / "cache", [{"name": "kd", "method": "logit"}], **overrides)
    spec = next(s for s in expand(suite) if s.kind == "distill")
    return spec, Context(suite, tmp_path / "results", "cpu")


def test_the_rows_a_method_trains_on_are_its_own_choice(tmp_path):
    spec, ctx = first_distill(tmp_path)
    data = ctx.encoded(spec, "train") + ctx.encoded(spec, "transfer")
    assert len(data) == 64 + 32
    assert distillation_rows(spec, ctx, LogitKD()) == data
    assert distillation_rows(spec, ctx, EveryOtherRow()) == data[::2]


def test_decoding_is_refused_in_one_line_where_the_task_cannot_decode(tmp_path):
    spec, ctx = first_distill(tmp_path)
    check_and_bind(spec, ctx, LogitKD())  # asks for nothing: nothing bound, nothing refused
    with pytest.raises(KdbenchError, match=r"^method 'kd': self-written KD needs a seq2seq or causal LM task; task "
                                           r"'sentiment' has a classification head$"):
        check_and_bind(spec, ctx, WritesItsOwn())
    with pytest.raises(KdbenchError, match=r"^method 'kd': teacher-written KD needs a seq2seq or causal LM task; "
                                           r"task 'sentiment' has a classification head$"):
        distillation_rows(spec, ctx, DecodedByTheTeacher())


def test_the_students_decoding_is_bound_with_the_runs_seed_and_checked_first(tmp_path):
    spec, ctx = first_distill(tmp_path, tasks=[LM_TASK], pairs=[LM_PAIR], seeds=[7])
    objective = WritesItsOwn()
    check_and_bind(spec, ctx, objective)
    write, collate, seed = objective.bound
    assert callable(write) and collate is ctx.collator(spec) and seed == 7
    too_long = WritesItsOwn()
    too_long.prompt_length = 32
    with pytest.raises(KdbenchError, match=r"^method 'kd': prompt_length 32 leaves no room to continue within "
                                           r"max_seq_length 32$"):
        check_and_bind(spec, ctx, too_long)
    assert too_long.bound is None  # refused before anything was bound


def test_teacher_logits_are_cached_once_and_only_for_a_method_they_suffice_for(tmp_path, monkeypatch):
    from kdbench.train import teacher_cache

    calls = []
    cache = teacher_cache.cache_teacher_logits
    monkeypatch.setattr(teacher_cache, "cache_teacher_logits",
                        lambda *a, **kw: calls.append(len(a[1])) or cache(*a, **kw))
    spec, ctx = first_distill(tmp_path)
    distiller(spec, ctx, ReadsTheTeacherEveryStep())
    assert calls == []
    distiller(spec, ctx, LogitKD())
    distiller(spec, ctx, LogitKD())  # another method of the same task and pair: the same cache
    assert calls == [64 + 32]


def test_a_method_defined_outside_kdbench_runs_in_a_suite(tmp_path, monkeypatch):
    monkeypatch.setitem(methods._entries, "every_other_row", EveryOtherRow)
    suite = tiny_suite(tmp_path, tmp_path / "cache", [{"name": "kd", "method": "logit"},
                                                      {"name": "half", "method": "every_other_row"}],
                       training={"epochs": 1, "batch_size": 16, "max_seq_length": 32})
    outcome = run_suite(suite, show_progress=False)
    assert [r.status for r in outcome.runs] == ["ok"] * 4, [r.error for r in outcome.runs]
    samples = {m: read_result(run_path(outcome.results_dir, f"sentiment__pair__{m}__s0"))["training"]["samples"]
               for m in ("kd", "half")}
    assert samples == {"kd": 64 + 32, "half": (64 + 32) // 2}  # one epoch of batches of 16: as many as the rows
