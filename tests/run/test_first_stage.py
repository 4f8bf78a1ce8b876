"""Two-stage students in a run (kdbench.run.first_stage): the first stage is distilled once, kept on disk and reused
across re-runs and resumes, and the second stage's student starts from its weights with its own task's head."""

import shutil

import pytest
import torch

from kdbench.plan import expand, first_stage_spec
from kdbench.results import read_results
from kdbench.run.context import Context
from kdbench.run.first_stage import first_stage_folder, initial_student
from kdbench.run.runner import run_suite
from kdbench.suite import load_suite
from kdbench.train import loop
from tiny import write_suite
from tiny_two_stage import two_stage_data

FIRST = "corpus__pair__general__s0"


@pytest.fixture
def trainings(monkeypatch):
    """The description of every training that runs (loop.train), in order."""
    seen = []
    train = loop.train

    def counted(*args, **kwargs):
        seen.append(kwargs.get("description"))
        return train(*args, **kwargs)

    monkeypatch.setattr(loop, "train", counted)
    return seen


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The tiny two-stage suite, run once: (suite, results folder)."""
    folder = tmp_path_factory.mktemp("two-stage")
    suite = load_suite(write_suite(folder, two_stage_data(folder)))
    outcome = run_suite(suite, show_progress=False)
    assert [r.status for r in outcome.runs] == ["ok"] * len(outcome.runs), [r.error for r in outcome.runs]
    return suite, outcome.results_dir


def test_the_first_stage_is_distilled_once_and_kept_for_re_runs(ran, trainings):
    suite, out = ran
    first = next(s for s in expand(suite) if s.run_id == FIRST)
    ctx = Context(suite, out, "cpu")
    assert [p.name for p in (ctx.cache_dir / "first_stage").iterdir()] == [first_stage_folder(first, ctx).name]
    outcome = run_suite(suite, show_progress=False, rerun=True)  # every run again: the first stage from its cache
    assert all(r.status == "ok" for r in outcome.runs)
    assert "general, seed 0" not in trainings
    assert "kd, seed 0" in trainings  # the second stage's runs did train
    two_kd = next(r for r in read_results(out) if r["run_id"] == "sentiment__two__kd__s0")
    first_steps = next(r for r in read_results(out) if r["run_id"] == FIRST)["training"]["steps"]
    assert two_kd["training"]["steps"] > first_steps  # its row counts the first stage's training too


def test_a_resume_without_the_cached_first_stage_distils_it_again(tmp_path, trainings):
    data = two_stage_data(tmp_path)
    suite = load_suite(write_suite(tmp_path, data))
    run_suite(suite, show_progress=False, only=[s.run_id for s in expand(suite) if "__two__" not in s.run_id])
    assert trainings.count("general, seed 0") == 1
    shutil.rmtree(tmp_path / "cache" / "first_stage")  # its result stays; its model is gone
    outcome = run_suite(suite, show_progress=False)
    assert {r.run_id: r.status for r in outcome.runs}[FIRST] == "skipped"
    assert all(r.status in ("ok", "skipped") for r in outcome.runs)
    assert trainings.count("general, seed 0") == 2  # distilled again, once, for both runs that start from it
    assert len(list((tmp_path / "cache" / "first_stage").iterdir())) == 1


def test_the_second_stage_starts_from_the_first_stages_encoder_with_a_new_head(ran):
    from kdbench import models

    suite, out = ran
    ctx = Context(suite, out, "cpu")
    spec = next(s for s in expand(suite) if s.run_id == "sentiment__two__kd__s0")
    first = first_stage_spec(suite, spec.pair, spec.seed)
    saved = models.load_saved(first_stage_folder(first, ctx), ctx.head(first))  # the masked LM
    student, before = initial_student(spec, ctx)
    assert type(saved).__name__ == "BertForMaskedLM" and type(student).__name__ == "BertForSequenceClassification"
    assert student.num_labels == 2 and before.steps > 0
    theirs, mine = saved.state_dict(), student.state_dict()
    encoder = [k for k in mine if k.startswith(("bert.embeddings.", "bert.encoder."))]
    assert encoder and all(k in theirs for k in encoder)
    assert all(torch.equal(mine[k], theirs[k]) for k in encoder)
    # and the first stage trained them: they are not the initial student's
    fresh = initial_student(first, ctx)[0].state_dict()
    assert not all(torch.equal(fresh[k], theirs[k]) for k in encoder)
    again, _ = initial_student(spec, ctx)  # the new head is seeded
    assert torch.equal(again.classifier.weight, student.classifier.weight)


def test_the_ray_plan_runs_the_first_stage_first_and_ships_its_student(ran):
    pytest.importorskip("ray")
    from kdbench.run.ray_runs import plan_jobs

    suite, out = ran
    specs = expand(suite)
    ctx = Context(suite, out, "cpu")
    jobs, _ = plan_jobs(suite, specs, {s.run_id for s in specs}, ctx)
    by_id = {j.id: j for j in jobs}
    folder = f"first_stage/{first_stage_folder(first_stage_spec(suite, specs[-1].pair, 0), ctx).name}"
    assert by_id[FIRST].produces == (folder,)
    for run_id in ("sentiment__two__student__s0", "sentiment__two__kd__s0"):
        assert FIRST in by_id[run_id].deps
