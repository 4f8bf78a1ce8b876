"""Causal LM suites end to end: perplexity tables, fused_linear, cached sparse teachers and sequence-level KD."""

import pytest

from kdbench.results import read_result, run_path
from kdbench.run.runner import run_suite
from tiny import FAST_PROFILING, LM_PAIR, LM_TASK, tiny_suite


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Shared by the tests of this file: the teacher is fine-tuned once and loaded from here afterwards."""
    return tmp_path_factory.mktemp("cache")


def statuses(outcome) -> dict[str, str]:
    return {r.run_id.split("__", 2)[2]: r.status for r in outcome.runs}


KD = {"name": "kd", "method": "logit", "params": {"temperature": 2.0}}


def test_a_causal_lm_suite_runs_end_to_end_and_reports_perplexity(tmp_path, cache_dir):
    suite = tiny_suite(
        tmp_path, cache_dir,
        [KD, {"name": "hidden", "method": "hidden", "params": {"feature_weight": 1.0}}],
        tasks=[LM_TASK], pairs=[LM_PAIR],
        compression=[{"name": "int8", "steps": [{"compressor": "int8"}]}],
        profiling={**FAST_PROFILING, "generate_tokens": 4},
    )
    outcome = run_suite(suite, show_progress=False)
    assert statuses(outcome) == {"teacher": "ok", "student__s0": "ok", "kd__s0": "ok", "hidden__s0": "ok"}
    out = outcome.results_dir
    teacher = read_result(run_path(out, "lm__llama__teacher"))["variants"][0]
    kd = read_result(run_path(out, "lm__llama__kd__s0"))["variants"]
    assert [v["name"] for v in kd] == ["distilled", "int8"]
    for v in [teacher, *kd]:
        assert v["metric_name"] == "perplexity" and v["higher_is_better"] is False
        assert 1.0 < v["metric"] < float("inf")  # a perplexity: exp of a finite, positive mean NLL
    assert kd[0]["retention"] == pytest.approx(teacher["metric"] / kd[0]["metric"])
    readme = (out / "README.md").read_text()
    header = next(line for line in readme.splitlines() if line.startswith("| pair"))
    assert [c.strip() for c in header.split("|")][5:7] == ["perplexity", "retention"]
    assert "(lower is better)" in readme
    # decoding latency: 4 new tokens after a prompt cut to the model's 32 positions minus those 4
    for v in [teacher, *kd]:
        [(bs, g)] = v["generation"].items()
        assert (g["new_tokens"], g["prompt_tokens"]) == (4, 28) and g["ms_per_token"] > 0
    assert f"decode b{bs} ms/token" in header and "**decode ms/token**" in readme


def test_fused_linear_trains_a_causal_lm_student_as_the_logits_do(tmp_path, cache_dir):
    """The same method with `fused_linear` gives the same student: its metrics agree with the plain method's to
    rounding (the weight gradient is summed chunk by chunk), and a classification task refuses it in one line."""
    fused = {**KD, "name": "kd-fused", "params": {**KD["params"], "fused_linear": True}}
    suite = tiny_suite(
        tmp_path, cache_dir, [KD, fused],
        tasks=[LM_TASK], pairs=[LM_PAIR],
        training={"max_steps": 6, "batch_size": 4, "max_seq_length": 32},
    )
    outcome = run_suite(suite, show_progress=False)
    assert statuses(outcome) == {"teacher": "ok", "student__s0": "ok", "kd__s0": "ok", "kd-fused__s0": "ok"}
    plain, fused_run = ([v for v in read_result(run_path(outcome.results_dir, f"lm__llama__{m}__s0"))["variants"]
                         if v["name"] == "distilled"][0] for m in ("kd", "kd-fused"))
    student = read_result(run_path(outcome.results_dir, "lm__llama__student__s0"))["variants"][0]
    assert abs(plain["metric"] - student["metric"]) > 1e-3  # six steps of KD moved the student: the test can see
    assert fused_run["metric"] == pytest.approx(plain["metric"], rel=1e-5)
    assert fused_run["extra_metrics"] == pytest.approx(plain["extra_metrics"], rel=1e-5)

    classify = tiny_suite(tmp_path, cache_dir, [fused])
    [failed] = run_suite(classify, show_progress=False).failed
    assert failed.error == ("method 'kd-fused': fused_linear is for language-model tasks (vocabulary logits); task "
                            "'sentiment' has a classification head") and failed.error_kind == "input"


def test_a_cached_top_k_teacher_trains_as_the_teacher_does_when_k_covers_the_vocabulary(tmp_path, cache_dir,
                                                                                          monkeypatch):
    """teacher_top_k: the teacher runs once per task, pair, k and temperature, before training, and never during it.
    With k at least the vocabulary the loss is kd_loss exactly, so the student is the plain method's; a smaller k is
    another student. A classification task refuses it in one line."""
    from kdbench.train import distiller, teacher_cache

    caches = []
    cache = teacher_cache.cache_teacher_top_k
    monkeypatch.setattr(teacher_cache, "cache_teacher_top_k",
                        lambda *a, **kw: caches.append((kw["k"], kw.get("sampled", False))) or cache(*a, **kw))
    everything = {**KD, "name": "kd-all", "params": {**KD["params"], "teacher_top_k": 10_000}}
    few = {**KD, "name": "kd-top2", "params": {**KD["params"], "teacher_top_k": 2}}
    drawn = {**KD, "name": "kd-drawn4", "params": {**KD["params"], "teacher_samples": 4}}
    suite = tiny_suite(
        tmp_path, cache_dir, [KD, everything, few, drawn],
        tasks=[LM_TASK], pairs=[LM_PAIR],
        training={"max_steps": 6, "batch_size": 4, "max_seq_length": 32},
        seeds=[0, 1],
    )
    forward = []
    loss = distiller.Distiller.distillation_loss

    def spy(self, model, teacher, objective, head, inputs):  # does the teacher run during training?
        if teacher is None:  # the teacher's own fine-tuning, and the student alone
            return loss(self, model, teacher, objective, head, inputs)
        handle = teacher.register_forward_hook(lambda *a: forward.append(objective.sparse_teacher))
        try:
            return loss(self, model, teacher, objective, head, inputs)
        finally:
            handle.remove()

    monkeypatch.setattr(distiller.Distiller, "distillation_loss", spy)
    outcome = run_suite(suite, show_progress=False)
    assert set(statuses(outcome).values()) == {"ok"} and len(outcome.runs) == 11  # teacher, 2 x (alone + 4)
    assert sorted(caches) == [(2, False), (4, True), (10_000, False)]  # once per cache, whatever the seeds
    assert set(forward) == {None}  # only the plain method ran the teacher while training

    def distilled(run):
        return next(v for v in read_result(run_path(outcome.results_dir, f"lm__llama__{run}"))["variants"]
                    if v["name"] == "distilled")

    for seed in (0, 1):
        plain, cached, top2, drawn4 = (distilled(f"{m}__s{seed}") for m in ("kd", "kd-all", "kd-top2", "kd-drawn4"))
        assert cached["metric"] == pytest.approx(plain["metric"], rel=1e-5)
        assert cached["extra_metrics"] == pytest.approx(plain["extra_metrics"], rel=1e-5)
        assert abs(top2["metric"] - plain["metric"]) > 1e-4 and abs(drawn4["metric"] - top2["metric"]) > 1e-4

    # run again: the caches come from disk, the teacher does not run, and the students are the same
    first = distilled("kd-top2__s1")["metric"]
    again = run_suite(suite, show_progress=False, rerun=True, only=["lm__llama__kd-top2__s1"])
    assert [r.status for r in again.runs] == ["ok"] and len(caches) == 3
    assert distilled("kd-top2__s1")["metric"] == first

    classify = tiny_suite(tmp_path, cache_dir, [few])
    [failed] = run_suite(classify, show_progress=False).failed
    assert failed.error == ("method 'kd-top2': teacher_top_k caches a teacher's vocabulary logits at inputs that "
                            "repeat every epoch (causal and seq2seq LM tasks); task 'sentiment' is "
                            "classification") and failed.error_kind == "input"


def test_sequence_level_kd_on_a_causal_lm_trains_on_the_teachers_continuations(tmp_path, cache_dir, monkeypatch):
    suite = tiny_suite(
        tmp_path, cache_dir,
        [{"name": "seq", "method": "sequence", "params": {"prompt_length": 12}},
         {"name": "seq-refs", "method": "sequence", "params": {"prompt_length": 12, "alpha": 0.5,
                                                                "keep_references": True}},
         {"name": "seq-prompt", "method": "sequence", "params": {"prompt_length": 12, "prompt_loss": True}}],
        tasks=[{"name": "lm", "task": "generated_lm", "params": {"train_size": 64, "eval_size": 16}}],
        pairs=[LM_PAIR], training={"epochs": 1, "batch_size": 1, "max_seq_length": 32},  # samples = rows
    )
    from kdbench.heads.language_modeling import CausalLM

    decodings = []
    decode = CausalLM.decoded_targets
    monkeypatch.setattr(CausalLM, "decoded_targets",
                        lambda self, *a, **kw: decodings.append(1) or decode(self, *a, **kw))
    outcome = run_suite(suite, show_progress=False)
    assert statuses(outcome) == {"teacher": "ok", "student__s0": "ok", "seq__s0": "ok", "seq-refs__s0": "ok",
                                 "seq-prompt__s0": "ok"}, [r.error for r in outcome.runs]
    assert len(decodings) == 1  # the three methods decode alike: the teacher decodes once
    out = outcome.results_dir
    runs = {m: read_result(run_path(out, f"lm__llama__{m}"))
            for m in ("student__s0", "seq__s0", "seq-refs__s0", "seq-prompt__s0")}
    # one epoch: as many rows as the packed train blocks; with the gold blocks too, twice as many
    blocks = runs["student__s0"]["training"]["samples"]
    assert (runs["seq__s0"]["training"]["samples"], runs["seq-refs__s0"]["training"]["samples"],
            runs["seq-prompt__s0"]["training"]["samples"]) == (blocks, 2 * blocks, blocks)
    for result in runs.values():
        [v] = result["variants"]
        assert 1.0 < v["metric"] < float("inf") and 0.0 <= v["extra_metrics"]["token accuracy"] <= 1.0
    header = next(line for line in (out / "README.md").read_text().splitlines() if line.startswith("| pair"))
    assert [c.strip() for c in header.split("|")][5:8] == ["perplexity", "retention", "token accuracy"]
