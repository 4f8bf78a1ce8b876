"""A masked-LM suite end to end: trains, measures and reports perplexity."""

import pytest
import torch


def test_a_masked_lm_suite_runs_end_to_end_and_reports_perplexity(tmp_path):
    import yaml

    from kdbench.results import read_result, run_path
    from kdbench.run.runner import run_suite
    from kdbench.suite import load_suite

    threads = torch.get_num_threads()
    bert = {"model_type": "bert", "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32}
    data = {
        "name": "tiny-mlm", "device": "cpu", "seeds": [0],
        "tasks": [{"name": "mlm", "task": "generated_lm",
                   "params": {"objective": "masked", "train_size": 64, "eval_size": 16}}],
        "pairs": [{"name": "bert",
                   "teacher": {"model": {**bert, "hidden_size": 16, "intermediate_size": 32},
                               "finetune": {"max_steps": 2, "batch_size": 8}},
                   "student": {"model": {**bert, "hidden_size": 8, "intermediate_size": 16}}}],
        "methods": [{"name": "kd", "method": "logit", "params": {"temperature": 2.0}}],
        "training": {"max_steps": 2, "batch_size": 8, "max_seq_length": 32},
        "profiling": {"batch_sizes": [2], "warmup": 0, "min_repeats": 1, "max_repeats": 1, "time_budget_s": 0.01,
                      "memory": False},
        "output_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    torch.set_num_threads(1)  # tiny models on a shared 2-core box: spinning OpenMP threads cost ~10x
    try:
        outcome = run_suite(load_suite(tmp_path / "suite.yaml"), show_progress=False)
    finally:
        torch.set_num_threads(threads)
    assert [r.status for r in outcome.runs] == ["ok"] * 3, [r.error for r in outcome.runs]
    out = outcome.results_dir
    teacher = read_result(run_path(out, "mlm__bert__teacher"))["variants"][0]
    kd = read_result(run_path(out, "mlm__bert__kd__s0"))["variants"][0]
    for v in (teacher, kd):
        assert v["metric_name"] == "perplexity" and v["higher_is_better"] is False and 1.0 < v["metric"] < 1e6
    assert kd["retention"] == pytest.approx(teacher["metric"] / kd["metric"])
