"""A pair with `teachers`: each is fine-tuned, cached and reported as its own run, the students distil from their
ensemble (classification: its logits cached once per T), and retention is against the best teacher."""

import torch

from kdbench.plan import expand
from kdbench.results import read_result, run_path
from kdbench.run.context import Context
from kdbench.run.runner import run_suite
from kdbench.train.ensemble import TeacherEnsemble, average_logits
from tiny import BERT, tiny_suite

TEACHERS = [{"model": {**BERT, "hidden_size": 16, "intermediate_size": 32},
             "finetune": {"max_steps": 2, "batch_size": 16}, "weight": 2.0},
            {"model": {**BERT, "hidden_size": 8, "intermediate_size": 16},
             "finetune": {"max_steps": 3, "batch_size": 16, "learning_rate": 0.01}}]
STUDENT = {"model": {**BERT, "hidden_size": 8, "intermediate_size": 16}}
KD = {"name": "kd", "method": "logit", "params": {"temperature": 2.0}}


def test_two_teachers_run_end_to_end_with_a_row_each_and_retention_against_the_best(tmp_path):
    cache = tmp_path / "cache"
    suite = tiny_suite(tmp_path, cache, [KD], pairs=[{"name": "pair", "teachers": TEACHERS, "student": STUDENT}])
    outcome = run_suite(suite, show_progress=False)
    assert {r.run_id.split("__", 2)[2]: r.status for r in outcome.runs} == {
        "teacher1": "ok", "teacher2": "ok", "student__s0": "ok", "kd__s0": "ok"}
    out = outcome.results_dir
    metrics = [read_result(run_path(out, f"sentiment__pair__teacher{i}"))["variants"][0]["metric"] for i in (1, 2)]
    best = max(metrics)
    for run in ("student__s0", "kd__s0"):
        variant = read_result(run_path(out, f"sentiment__pair__{run}"))["variants"][0]
        assert variant["retention"] == variant["metric"] / best
    assert len(list((cache / "teachers").iterdir())) == 2  # each teacher fine-tuned and cached once

    readme = (out / "README.md").read_text()
    assert "| teacher 1 " in readme and "| teacher 2 " in readme
    assert "bert 1L/16H" in readme and "bert 1L/8H" in readme  # each teacher row names its own model
    best_label = "teacher 1" if metrics[0] >= metrics[1] else "teacher 2"
    assert f"are against the best, `{best_label}`" in readme

    # the students' teacher: both cached teachers behind one ensemble at the method's T, weighted 2:1
    ctx = Context(suite, out, "cpu")
    spec = next(s for s in expand(suite) if s.run_id == "sentiment__pair__kd__s0")
    ensemble = ctx.distillation_teacher(spec, 2.0)
    assert isinstance(ensemble, TeacherEnsemble) and ensemble.weights == [2.0, 1.0]
    first, second = (ctx.teacher(spec, i)[0] for i in (0, 1))
    assert list(ensemble.teachers) == [first, second]
    assert ctx.teacher(spec)[0] is (first if metrics[0] >= metrics[1] else second)  # speedups: against the best
    batch = {k: torch.tensor(v)[None] for k, v in ctx.encoded(spec, "eval")[0].items() if k != "labels"}
    with torch.no_grad():
        got = ensemble(**batch).logits
        want = average_logits([first(**batch).logits, second(**batch).logits], [2.0, 1.0], 2.0)
    assert torch.allclose(got, want)


def test_a_cached_top_k_teacher_of_a_language_model_is_the_ensembles(tmp_path):
    """teacher_top_k with two teachers: the cache holds the top-k of their ensemble's distribution at T (here the
    softmax of their average logits), made once before training. On-policy KD runs the ensemble on the student's
    own text at every step."""
    from kdbench.kernels import teacher_top_k
    from kdbench.models import model_inputs
    from kdbench.train import teacher_cache
    from tiny import LLAMA, LM_PAIR, LM_TASK

    wide = {"model": {**LLAMA, "hidden_size": 16, "intermediate_size": 32}, "finetune": {"max_steps": 2}}
    narrow = {"model": {**LLAMA, "hidden_size": 8, "intermediate_size": 16}, "finetune": {"max_steps": 1},
              "weight": 0.5}
    pair = {"name": "llama", "teachers": [wide, narrow], "teacher_average": "logits", "student": LM_PAIR["student"]}
    top = {"name": "kd-top4", "method": "logit", "params": {"temperature": 2.0, "teacher_top_k": 4}}
    gkd = {"name": "gkd", "method": "on_policy", "params": {"lmbda": 1.0, "max_new_tokens": 4}}
    suite = tiny_suite(tmp_path, tmp_path / "cache", [top, gkd], tasks=[LM_TASK], pairs=[pair])
    outcome = run_suite(suite, show_progress=False)
    assert {r.run_id.split("__", 2)[2]: r.status for r in outcome.runs} == {
        "teacher1": "ok", "teacher2": "ok", "student__s0": "ok", "kd-top4__s0": "ok", "gkd__s0": "ok"}

    ctx = Context(suite, outcome.results_dir, "cpu")
    spec = next(s for s in expand(suite) if s.method is not None and s.method.name == "kd-top4")
    [path] = (tmp_path / "cache" / "sparse_teacher").glob(f"*/{teacher_cache.TOP_K_FILE}")
    rows = ctx.encoded(spec, "train") + ctx.encoded(spec, "transfer")
    saved = teacher_cache.load_teacher_top_k(path, rows)
    ensemble = ctx.distillation_teacher(spec, 2.0)
    assert ensemble.average == "logits" and ensemble.weights == [1.0, 0.5]
    batch = {k: v for k, v in ctx.collator(spec)(rows[:1]).items() if k != "labels"}
    with torch.no_grad():
        members = [t(**model_inputs(batch, t)).logits for t in ensemble.teachers]
    log_probs, ids = teacher_top_k(average_logits(members, [1.0, 0.5], 2.0, "logits"), 4, temperature=2.0)
    length = len(rows[0]["labels"])
    assert torch.equal(saved[0]["teacher_top_ids"], ids[0, :length])
    assert torch.allclose(saved[0]["teacher_top_log_probs"], log_probs[0, :length], atol=1e-5)


def test_a_multitask_group_distils_each_task_from_that_tasks_teachers(tmp_path):
    tasks = [{"name": name, "task": "generated_sentiment", "params": {"train_size": 32, "eval_size": 16, "seed": seed}}
             for name, seed in (("first", 0), ("second", 1))]
    suite = tiny_suite(tmp_path, tmp_path / "cache", [KD], tasks=tasks,
                       pairs=[{"name": "pair", "teachers": TEACHERS, "student": STUDENT}],
                       multitask=[{"name": "mt-kd", "tasks": ["first", "second"], "method": "kd"}])
    outcome = run_suite(suite, show_progress=False)
    assert {r.status for r in outcome.runs} == {"ok"} and len(outcome.runs) == 2 * 5  # 2 teachers, alone, kd, mt-kd
    out = outcome.results_dir
    for task in ("first", "second"):
        best = max(read_result(run_path(out, f"{task}__pair__teacher{i}"))["variants"][0]["metric"] for i in (1, 2))
        variant = read_result(run_path(out, f"{task}__pair__mt-kd__s0"))["variants"][0]
        assert variant["retention"] == variant["metric"] / best


def test_a_teacher_of_several_has_the_cache_key_it_has_alone_and_the_ensemble_its_own(tmp_path):
    lone = tiny_suite(tmp_path, tmp_path / "cache", [KD], pairs=[{"name": "pair", "teacher": {
        k: v for k, v in TEACHERS[0].items() if k != "weight"}, "student": STUDENT}])
    multi = tiny_suite(tmp_path, tmp_path / "cache", [KD], pairs=[{"name": "pair", "teachers": TEACHERS,
                                                                   "student": STUDENT}])
    by_logits = tiny_suite(tmp_path, tmp_path / "cache", [KD], pairs=[{"name": "pair", "student": STUDENT,
                                                                        "teachers": [TEACHERS[0], TEACHERS[1]],
                                                                        "teacher_average": "logits"}])
    keys = {}
    for name, suite in (("lone", lone), ("multi", multi), ("logits", by_logits)):
        ctx = Context(suite, tmp_path / "results", "cpu")
        student = next(s for s in expand(suite) if s.kind == "student")
        keys[name] = (ctx.teacher_key(student, 0 if name != "lone" else None), ctx.teacher_key(student))
    assert keys["multi"][0] == keys["lone"][0]  # its weight is the ensemble's: fine-tuned and cached once
    assert keys["multi"][1] != keys["lone"][1]  # the ensemble (sparse caches, multitask groups) is keyed apart
    assert keys["logits"][1] != keys["multi"][1]  # and by how it averages


def test_a_failed_teacher_stops_its_students_and_is_named(tmp_path):
    untrained = {"model": TEACHERS[1]["model"]}  # an inline config without `finetune:` cannot be a teacher
    suite = tiny_suite(tmp_path, tmp_path / "cache", [KD],
                       pairs=[{"name": "pair", "teachers": [TEACHERS[0], untrained], "student": STUDENT}])
    outcome = run_suite(suite, show_progress=False)
    errors = {r.run_id.split("__", 2)[2]: (r.status, r.error) for r in outcome.runs}
    assert errors["teacher1"] == ("ok", None)
    assert errors["teacher2"] == ("failed", "pairs.pair.teachers.1: an inline config needs `finetune:` settings")
    for run in ("student__s0", "kd__s0"):
        assert errors[run] == ("failed", "teacher run sentiment__pair__teacher2 did not succeed; its students "
                                         "cannot run")
