"""The runner: failures are recorded and the suite goes on, finished runs are never lost, results are atomic."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdbench import heads, models, runner
from kdbench.errors import KdbenchError
from kdbench.methods import LogitKD, methods
from kdbench.results import is_done, read_result, run_path, write_result
from kdbench.runner import keep_finished, run_suite
from kdbench.suite import expand, load_suite
from tiny import FAST_PROFILING, LM_PAIR, LM_TASK, tiny_suite_data

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"





@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Shared by the tests of this file: the teacher is fine-tuned once and loaded from here afterwards."""
    return tmp_path_factory.mktemp("cache")


class NanKD(LogitKD):
    """A method whose loss is NaN from the first step: how a diverging run looks to the runner."""

    def loss(self, student_out, teacher_out, labels):
        return super().loss(student_out, teacher_out, labels) * float("nan")


@pytest.fixture
def nan_method(monkeypatch):
    monkeypatch.setitem(methods._entries, "nan_loss", NanKD)


def tiny_suite(tmp_path: Path, cache_dir: Path, methods_: list[dict], **overrides):
    """A seconds-long suite, written as YAML and loaded the way a user's is."""
    data = tiny_suite_data(tmp_path, cache_dir, methods_, **overrides)
    path = tmp_path / f"suite-{len(list(tmp_path.glob('suite-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_suite(path)


def snapshot(results_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((results_dir / "runs").glob("*.json"))}


def statuses(outcome) -> dict[str, str]:
    return {r.run_id.split("__", 2)[2]: r.status for r in outcome.runs}


KD = {"name": "kd", "method": "logit", "params": {"temperature": 2.0}}
NAN = {"name": "nan", "method": "nan_loss"}
KD_AFTER = {"name": "kd-after", "method": "logit", "params": {"alpha": 0.9}}


def test_a_failed_run_is_recorded_the_suite_goes_on_and_nothing_is_lost(tmp_path, cache_dir, nan_method):
    first = run_suite(tiny_suite(tmp_path, cache_dir, [KD]), show_progress=False)
    assert statuses(first) == {"teacher": "ok", "student__s0": "ok", "kd__s0": "ok"}
    assert first.exit_code == 0
    out = first.results_dir
    assert out == tmp_path / "results" / "tiny"
    finished = snapshot(out)
    assert len(finished) == 3

    # The same suite with a method whose loss is NaN, then one more method after it.
    suite = tiny_suite(tmp_path, cache_dir, [KD, NAN, KD_AFTER])
    second = run_suite(suite, show_progress=False)
    assert statuses(second) == {"teacher": "skipped", "student__s0": "skipped", "kd__s0": "skipped",
                                "nan__s0": "failed", "kd-after__s0": "ok"}
    assert second.exit_code == 2  # a NaN loss is reported like bad input: one line, exit code 2
    [failed] = second.failed
    assert failed.error_kind == "input" and failed.error == "loss is nan at step 1; run stopped"

    after = snapshot(out)
    assert {k: after[k] for k in finished} == finished  # finished runs untouched, byte for byte
    record = read_result(run_path(out, "sentiment__pair__nan__s0"))
    assert record["status"] == "failed" and record["error_kind"] == "input"
    assert record["error"] == "loss is nan at step 1; run stopped" and record["variants"] == []
    spec = next(s for s in expand(suite) if s.run_id == "sentiment__pair__nan__s0")
    assert record["spec_hash"] == spec.spec_hash and record["spec"] == spec.model_dump(mode="json")
    assert record["versions"]["torch"] == torch.__version__ and record["device"]["type"] == "cpu"
    assert read_result(run_path(out, "sentiment__pair__kd-after__s0"))["status"] == "ok"

    readme = (out / "README.md").read_text()
    [failed_line] = [line for line in readme.splitlines() if "sentiment__pair__nan__s0" in line]
    assert "loss is nan at step 1" in failed_line
    assert any(line.startswith("|") and "kd-after" in line for line in readme.splitlines())

    # Failed runs are retried on the next invocation; finished ones are not.
    third = run_suite(suite, show_progress=False)
    assert statuses(third) == {"teacher": "skipped", "student__s0": "skipped", "kd__s0": "skipped",
                               "nan__s0": "failed", "kd-after__s0": "skipped"}
    assert {k: v for k, v in snapshot(out).items() if "nan" not in k} == {
        k: v for k, v in after.items() if "nan" not in k}


def test_a_bug_is_recorded_with_its_traceback_and_exit_code_1(tmp_path, cache_dir, monkeypatch):
    def broken(spec, ctx):
        raise ZeroDivisionError("a bug in the student run")

    monkeypatch.setitem(runner.RUNNERS, "student", broken)
    outcome = run_suite(tiny_suite(tmp_path, cache_dir, [KD], seeds=[0, 1]), show_progress=False)
    assert statuses(outcome) == {"teacher": "ok", "student__s0": "failed", "kd__s0": "ok",
                                 "student__s1": "failed", "kd__s1": "ok"}
    assert outcome.exit_code == 1
    record = read_result(run_path(outcome.results_dir, "sentiment__pair__student__s0"))
    assert record["error"] == "ZeroDivisionError: a bug in the student run" and record["error_kind"] == "bug"
    assert "Traceback" in record["traceback"] and "broken" in record["traceback"]


def test_a_failed_teacher_fails_its_students_in_one_line_each(tmp_path, cache_dir):
    task = {"name": "local", "task": "text_classification",
            "params": {"train_file": str(tmp_path / "missing.tsv"), "eval_file": str(tmp_path / "missing.tsv")}}
    outcome = run_suite(tiny_suite(tmp_path, cache_dir, [KD], tasks=[task]), show_progress=False)
    assert statuses(outcome) == {"teacher": "failed", "student__s0": "failed", "kd__s0": "failed"}
    assert outcome.exit_code == 2
    errors = [r.error for r in outcome.runs]
    assert errors[0] == f"task data file not found: {tmp_path / 'missing.tsv'}"
    assert errors[1:] == ["teacher run local__pair__teacher did not succeed; its students cannot run"] * 2
    readme = (outcome.results_dir / "README.md").read_text()
    assert f"task data file not found: {tmp_path / 'missing.tsv'}" in readme


def test_cuda_requested_without_cuda_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(KdbenchError, match="device: cuda was requested but no CUDA device is available"):
        runner.resolve_device("cuda")
    assert runner.resolve_device("auto") == "cpu"


def test_write_result_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "runs" / "r.json"
    write_result(path, {"status": "ok", "n": 1})
    before = path.read_bytes()

    def crash(obj, f, **kwargs):
        f.write('{"status": "o')  # half a JSON, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", crash)
    with pytest.raises(KeyboardInterrupt):
        write_result(path, {"status": "failed"})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------------------------
# The real SST-2 copy through the local-files task


@pytest.mark.slow
def test_sst2_local_suite_cut_down(tmp_path, monkeypatch):
    """suites/sst2-local.yaml with a few hundred rows and a few steps: the table covers every variant and every
    accuracy is a count over the 872 test sentences."""
    if not (SHARED_DATA / "sst2" / "train.tsv").is_file():
        pytest.skip(f"{SHARED_DATA / 'sst2'} is absent")
    suite_file = REPO / "suites" / "sst2-local.yaml"
    data = yaml.safe_load(suite_file.read_text())
    params = data["tasks"][0]["params"]
    for key in ("train_file", "eval_file"):  # relative to the suite file, which the cut-down copy is not beside
        params[key] = str((suite_file.parent / params[key]).resolve())
    params.update(max_train=300, transfer_from_train=200)
    data["pairs"][0]["teacher"]["finetune"] = {"max_steps": 20, "batch_size": 32, "learning_rate": 2e-3}
    data["training"].update(max_steps=20)
    data["compression"] = [c for c in data["compression"] if c["name"] == "int8"]
    data["profiling"] = {**FAST_PROFILING, "batch_sizes": [1, 8]}
    data.update(output_dir=str(tmp_path / "results"), cache_dir=str(tmp_path / "cache"))
    cut = tmp_path / "sst2-cut.yaml"
    cut.write_text(yaml.safe_dump(data))

    outcome = run_suite(load_suite(cut), show_progress=False)
    assert [r.status for r in outcome.runs] == ["ok"] * 3, [r.error for r in outcome.runs]
    readme = (outcome.results_dir / "README.md").read_text()
    assert "## sst2" in readme
    for row in ("| teacher ", "| student alone ", "| logit-kd ", "| logit-kd + int8 "):
        assert row in readme, row
    for record in (read_result(p) for p in (outcome.results_dir / "runs").glob("*.json")):
        for variant in record["variants"]:
            correct = variant["metric"] * 872
            assert abs(correct - round(correct)) < 1e-3, (variant["name"], variant["metric"])


def test_a_failed_rerun_never_overwrites_a_finished_result(tmp_path):
    path = run_path(tmp_path, "t__p__kd__s0")
    failed = {"run_id": "t__p__kd__s0", "status": "failed"}
    assert keep_finished(path, failed) == path  # nothing there yet: the failure is recorded in place
    write_result(path, {"run_id": "t__p__kd__s0", "status": "ok"})
    assert keep_finished(path, failed) == tmp_path / "runs" / "failed" / "t__p__kd__s0.json"
    assert keep_finished(path, {"run_id": "t__p__kd__s0", "status": "ok"}) == path  # a new ok replaces it


def test_every_student_gets_the_teacher_of_the_teacher_run(tmp_path, cache_dir):
    """A resumed suite may first ask for the teacher from a later seed's run: it must be the same teacher (the one
    fine-tuned with the suite's first seed, whose accuracy the teacher run recorded), not a new one."""
    suite = tiny_suite(tmp_path, cache_dir, [{"name": "kd", "method": "logit"}], seeds=[3, 5])
    specs = expand(suite)
    ctx = runner.Context(suite, tmp_path / "results", "cpu")
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
    from kdbench import trainer

    caches = []
    cache = trainer.cache_teacher_top_k
    monkeypatch.setattr(trainer, "cache_teacher_top_k",
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
    loss = trainer.Distiller.distillation_loss

    def spy(self, model, teacher, objective, head, inputs):  # does the teacher run during training?
        if teacher is None:  # the teacher's own fine-tuning, and the student alone
            return loss(self, model, teacher, objective, head, inputs)
        handle = teacher.register_forward_hook(lambda *a: forward.append(objective.sparse_teacher))
        try:
            return loss(self, model, teacher, objective, head, inputs)
        finally:
            handle.remove()

    monkeypatch.setattr(trainer.Distiller, "distillation_loss", spy)
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


def test_a_method_can_start_from_the_trained_student_alone(tmp_path, cache_dir, monkeypatch):
    """start_from: student distils the student alone of the same seed, as trained: the student run keeps it on
    disk, the method starts from exactly those weights, and its row counts both trainings' steps. A resumed suite
    whose student run is done loads it instead of training it again."""
    from kdbench import trainer

    sft = {"name": "kd-sft", "method": "logit", "params": {"temperature": 2.0}, "start_from": "student"}
    starts = {}
    train = trainer.train

    def spy(model, *a, description="", **kw):
        starts[description] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return train(model, *a, description=description, **kw)

    monkeypatch.setattr(trainer, "train", spy)
    suite = tiny_suite(tmp_path, cache_dir, [KD, sft])
    outcome = run_suite(suite, show_progress=False)
    assert statuses(outcome) == {"teacher": "ok", "student__s0": "ok", "kd__s0": "ok", "kd-sft__s0": "ok"}
    [cached] = list((cache_dir / "students").iterdir())
    alone = models.load_saved(cached, heads.get("classification"))
    start = starts["kd-sft, seed 0"]
    assert all(torch.equal(start[k], v) for k, v in alone.state_dict().items())
    assert not all(torch.equal(start[k], v) for k, v in starts["kd, seed 0"].items())  # kd starts from init
    out = outcome.results_dir
    steps = {m: read_result(run_path(out, f"sentiment__pair__{m}__s0"))["training"]["steps"]
             for m in ("student", "kd", "kd-sft")}
    assert steps["kd-sft"] == steps["student"] + steps["kd"]

    run_path(out, "sentiment__pair__kd-sft__s0").unlink()  # resumed: only kd-sft runs again
    starts.clear()
    outcome = run_suite(suite, show_progress=False)
    assert statuses(outcome)["kd-sft__s0"] == "ok" and list(starts) == ["kd-sft, seed 0"]
    assert all(torch.equal(starts["kd-sft, seed 0"][k], v) for k, v in alone.state_dict().items())


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
        ctx = runner.Context(suite, tmp_path / "results", "cpu")
        keys.append((ctx.tokenizer_key(spec), ctx.teacher_key(spec), spec.spec_hash))
    assert keys[0][0] != keys[1][0] and keys[0][1] != keys[1][1]
    assert keys[0][2] == keys[1][2]  # the run's own spec is unchanged: only the caches below it follow the data


def test_results_are_rerun_when_the_data_changes_under_the_same_spec(tmp_path, cache_dir):
    """Resuming skips finished runs, but not those whose task data changed: their numbers would be stale."""
    data = tmp_path / "train.tsv"
    task = {"name": "local", "task": "text_classification",
            "params": {"train_file": str(data), "eval_file": str(data), "text_column": "sentence"}}
    rows = ["a good film\t1", "a bad film\t0", "a fine film\t1", "a dull film\t0"]

    def run(lines):
        data.write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
        return {r.run_id.split("__", 2)[-1]: r.status
                for r in run_suite(tiny_suite(tmp_path, cache_dir, [KD], tasks=[task]), show_progress=False).runs}

    assert set(run(rows).values()) == {"ok"}
    assert set(run(rows).values()) == {"skipped"}
    assert set(run(rows[:3] + ["a sad film\t0"]).values()) == {"ok"}
    out = tmp_path / "results" / "tiny"
    keys = {read_result(p)["data_key"] for p in (out / "runs").glob("*.json")}
    assert len(keys) == 1 and None not in keys  # every run carries the key of the data it was made from


def test_results_and_teachers_are_not_reused_across_process_counts(tmp_path, cache_dir, monkeypatch):
    """Under data parallel a step takes batch_size rows from each process: a result or a cached teacher trained
    with another process count is not the same experiment. One process keeps the keys it always had."""
    suite = tiny_suite(tmp_path, cache_dir, [KD])
    spec = expand(suite)[0]
    one = runner.Context(suite, tmp_path / "results", "cpu").teacher_key(spec)
    outcome = run_suite(suite, show_progress=False)
    path = run_path(outcome.results_dir, spec.run_id)
    assert is_done(path, spec.spec_hash, read_result(path)["data_key"])
    assert not is_done(path, spec.spec_hash, read_result(path)["data_key"], world_size=2)
    record = read_result(path)
    write_result(path, {**record, "distributed": {"world_size": 2, "backend": "gloo"}})
    assert is_done(path, spec.spec_hash, record["data_key"], world_size=2)
    assert not is_done(path, spec.spec_hash, record["data_key"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the key needs no process group
    two = runner.Context(suite, tmp_path / "results", "cpu").teacher_key(spec)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert two != one == runner.Context(suite, tmp_path / "results", "cpu").teacher_key(spec)


def test_a_cached_teacher_reports_the_fine_tuning_that_made_it(tmp_path):
    """A teacher loaded from the cache (another results folder, a re-run) still shows its fine-tuning's stats."""
    cache = tmp_path / "cache"
    first = run_suite(tiny_suite(tmp_path, cache, []), show_progress=False)
    second = run_suite(tiny_suite(tmp_path, cache, [], output_dir=str(tmp_path / "elsewhere")), show_progress=False)
    trained, loaded = (read_result(run_path(o.results_dir, "sentiment__pair__teacher")) for o in (first, second))
    assert trained["training"]["steps"] == 2 and trained["training"]["wall_s"] > 0
    assert loaded["training"] == trained["training"]
