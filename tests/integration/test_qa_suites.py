"""One tiny suite per question-answering head, end to end: trained, compressed, measured and reported."""

import pytest
import yaml

from kdbench.results import read_result, run_path
from kdbench.run.runner import run_suite
from kdbench.suite import load_suite

BERT = {"model_type": "bert", "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64}


FAST_PROFILING = {"batch_sizes": [1, 2], "warmup": 0, "min_repeats": 1, "max_repeats": 1, "time_budget_s": 0.01,
                  "memory": False}


def tiny_suite(tmp_path, task: dict):
    data = {
        "name": "tiny-qa", "device": "cpu", "seeds": [0], "tasks": [task],
        "pairs": [{"name": "pair",
                   "teacher": {"model": {**BERT, "hidden_size": 16, "intermediate_size": 32},
                               "finetune": {"max_steps": 2, "batch_size": 8}},
                   "student": {"model": {**BERT, "hidden_size": 8, "intermediate_size": 16}}}],
        "methods": [{"name": "kd", "method": "logit", "params": {"temperature": 2.0}},
                    {"name": "hidden", "method": "hidden", "params": {"feature_weight": 1.0}}],
        "compression": [{"name": "int8", "steps": [{"compressor": "int8"}]},
                        {"name": "pruned", "steps": [{"compressor": "prune_structured", "params": {"amount": 0.5}}],
                         "recover_steps": 1}],
        "training": {"max_steps": 2, "batch_size": 8, "max_seq_length": 48},
        "profiling": FAST_PROFILING,
        "output_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_suite(path)


@pytest.mark.parametrize("task, metric", [
    ({"name": "qa", "task": "generated_qa", "params": {"train_size": 32, "transfer_size": 16, "eval_size": 12}},
     "f1"),
    ({"name": "mc", "task": "generated_multiple_choice",
      "params": {"train_size": 32, "transfer_size": 16, "eval_size": 12}}, "accuracy"),
])
def test_a_qa_suite_runs_end_to_end(tmp_path, task, metric):
    outcome = run_suite(tiny_suite(tmp_path, task), show_progress=False)
    assert {r.run_id.split("__", 2)[2]: r.status for r in outcome.runs} == {
        "teacher": "ok", "student__s0": "ok", "kd__s0": "ok", "hidden__s0": "ok"}, [r.error for r in outcome.runs]
    assert outcome.exit_code == 0, [r.failed_variants for r in outcome.runs]
    out = outcome.results_dir
    teacher = read_result(run_path(out, f"{task['name']}__pair__teacher"))["variants"][0]
    kd = read_result(run_path(out, f"{task['name']}__pair__kd__s0"))["variants"]
    assert [v["name"] for v in kd] == ["distilled", "int8", "pruned"]
    for v in [teacher, *kd]:
        assert v["metric_name"] == metric and v["higher_is_better"] is True and 0.0 <= v["metric"] <= 1.0
        assert v["latency"]  # profiled on real (B, L) or (B, C, L) batches
    readme = (out / "README.md").read_text()
    assert f"| {metric}" in readme or f"{metric} |" in readme
