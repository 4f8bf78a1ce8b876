"""Tiny T5 suites end to end: perplexity, the layer methods on both stacks, and the committed seq2seq suites
validate."""

from pathlib import Path

import pytest
import yaml

from kdbench.results import read_result, run_path
from kdbench.run.context import Context
from kdbench.run.measure import example_batch
from kdbench.run.runner import run_suite
from kdbench.plan import expand
from kdbench.suite import load_suite
from tiny import T5


def tiny_suite(tmp_path, methods: list[dict], teacher: dict | None = None):
    """A tiny T5 suite (2 training steps) with `methods`, written to tmp_path and loaded; `teacher`: its model."""
    data = {
        "name": "tiny-t5", "device": "cpu", "seeds": [0],
        "tasks": [{"name": "s2s", "task": "generated_seq2seq", "params": {"train_size": 48, "eval_size": 16}}],
        "pairs": [{"name": "t5",
                   "teacher": {"model": teacher or {**T5, "d_model": 16, "d_ff": 32},
                               "finetune": {"max_steps": 2, "batch_size": 8}},
                   "student": {"model": {**T5, "d_model": 8, "d_ff": 16}}}],
        "methods": methods,
        "compression": [{"name": "int8", "steps": [{"compressor": "int8"}]}],
        "training": {"max_steps": 2, "batch_size": 8, "max_seq_length": 32},
        "profiling": {"batch_sizes": [2], "warmup": 0, "min_repeats": 1, "max_repeats": 1, "time_budget_s": 0.01,
                      "memory": False, "seq_length": 24},
        "output_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return load_suite(tmp_path / "suite.yaml")


def test_a_seq2seq_suite_runs_end_to_end_and_reports_perplexity(tmp_path):
    suite = tiny_suite(tmp_path, [{"name": "kd", "method": "logit", "params": {"temperature": 2.0}}])
    outcome = run_suite(suite, show_progress=False)
    assert {r.run_id.split("__", 2)[2]: r.status for r in outcome.runs} == {
        "teacher": "ok", "student__s0": "ok", "kd__s0": "ok"}, [r.error for r in outcome.runs]
    out = outcome.results_dir
    teacher = read_result(run_path(out, "s2s__t5__teacher"))["variants"][0]
    student = read_result(run_path(out, "s2s__t5__student__s0"))["variants"][0]
    kd = read_result(run_path(out, "s2s__t5__kd__s0"))["variants"]
    assert [v["name"] for v in kd] == ["distilled", "int8"]
    for v in [teacher, student, *kd]:
        assert v["metric_name"] == "perplexity" and v["higher_is_better"] is False
        assert 1.0 < v["metric"] < float("inf")
    assert kd[0]["retention"] == pytest.approx(teacher["metric"] / kd[0]["metric"])
    assert student["params"] < teacher["params"]
    assert "(lower is better)" in (out / "README.md").read_text()

    # the pair's tokenizer learned the targets' words too ('positive' is in no source)
    ctx = Context(suite, out, "cpu")
    spec = next(s for s in expand(suite) if s.kind == "teacher")
    assert {"positive", "negative"} <= set(ctx.tokenizer(spec).get_vocab())
    # the profiling batch carries the decoder inputs, at the profiling length for the source
    batch = example_batch(spec, ctx, 3)
    assert batch["input_ids"].shape == (3, 24) and batch["decoder_input_ids"].shape[0] == 3
    assert "labels" not in batch


def test_seq2seq_suites_validate():
    from kdbench.suite_checks import check_registry_names

    repo = Path(__file__).resolve().parents[2]
    for name in ("seq2seq-quickstart.yaml", "t5-large-to-t5-small.yaml", "bart-large-cnn-to-distilbart.yaml"):
        suite = load_suite(repo / "suites" / name)
        check_registry_names(suite)
        assert {t.task for t in suite.tasks} <= {"generated_seq2seq", "xsum", "cnn_dailymail"}


def test_a_seq2seq_suite_distills_with_hidden_attention_and_progressive(tmp_path):
    methods = [{"name": "fitnets", "method": "hidden", "params": {"temperature": 2.0}},
               {"name": "at", "method": "attention", "params": {"temperature": 2.0}},
               {"name": "prog", "method": "progressive", "params": {"temperature": 2.0}}]
    teacher = {**T5, "num_layers": 2, "num_heads": 4, "d_model": 16, "d_ff": 32}  # 2 + 2 layers, 4 heads
    outcome = run_suite(tiny_suite(tmp_path, methods, teacher=teacher), show_progress=False)
    assert {r.run_id.split("__", 2)[2]: r.status for r in outcome.runs} == {
        "teacher": "ok", "student__s0": "ok", "fitnets__s0": "ok", "at__s0": "ok", "prog__s0": "ok"}, [
        r.error for r in outcome.runs]
    out = outcome.results_dir
    student = read_result(run_path(out, "s2s__t5__student__s0"))["variants"][0]
    for name in ("fitnets", "at", "prog"):
        variants = read_result(run_path(out, f"s2s__t5__{name}__s0"))["variants"]
        assert [v["name"] for v in variants] == ["distilled", "int8"]
        assert 1.0 < variants[0]["metric"] < float("inf")
        assert variants[0]["params"] == student["params"]  # the projections were dropped after training
