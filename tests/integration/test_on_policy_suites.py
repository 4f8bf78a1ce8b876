"""On-policy KD suites: a causal LM and a seq2seq pair end to end, and the tasks and settings refused in one line."""

from kdbench.results import read_result, run_path
from kdbench.run.runner import run_suite
from tiny import FAST_PROFILING, LM_PAIR, T5, tiny_suite, tiny_suite_data


T5_PAIR = {"name": "t5", "teacher": {"model": {**T5, "d_model": 16, "d_ff": 32},
                                     "finetune": {"max_steps": 2, "batch_size": 8}},
           "student": {"model": {**T5, "d_model": 8, "d_ff": 16}}}


def suite_of(tmp_path, methods_, task, pair, **overrides):
    return tiny_suite(tmp_path, tmp_path / "cache", methods_, tasks=[task], pairs=[pair], **overrides)


def test_on_policy_suites_run_for_a_causal_lm_and_a_seq2seq_pair_and_a_classifier_is_refused(tmp_path, monkeypatch):
    from kdbench.heads.language_modeling import CausalLM
    from kdbench.heads.seq2seq import Seq2Seq

    calls = {"causal": 0, "seq2seq": 0}
    for cls, key in ((CausalLM, "causal"), (Seq2Seq, "seq2seq")):
        real = cls.decoded_targets

        def spy(self, *a, real=real, key=key, **kw):
            calls[key] += kw.get("sample_temperature") is not None
            return real(self, *a, **kw)

        monkeypatch.setattr(cls, "decoded_targets", spy)
    relabelled = []
    with_prompt_loss = CausalLM.with_prompt_loss
    monkeypatch.setattr(CausalLM, "with_prompt_loss",
                        staticmethod(lambda rows: relabelled.append(len(rows)) or with_prompt_loss(rows)))
    gkd = {"name": "gkd", "method": "on_policy", "params": {"lmbda": 1.0, "prompt_length": 12}}
    gkd_prompt = {"name": "gkd-prompt", "method": "on_policy",
                  "params": {"lmbda": 1.0, "prompt_length": 12, "prompt_loss": True}}
    lm = suite_of(tmp_path, [gkd, gkd_prompt], {"name": "lm", "task": "generated_lm",
                                     "params": {"train_size": 64, "eval_size": 16}},
                  LM_PAIR,
                  training={"max_steps": 3, "batch_size": 4, "max_seq_length": 32})
    outcome = run_suite(lm, show_progress=False)
    assert [r.status for r in outcome.runs] == ["ok"] * 4, [r.error for r in outcome.runs]
    assert calls["causal"] == 6  # lmbda 1: every one of the 3 steps of each method was written by the student
    assert relabelled == [4, 4, 4]  # prompt_loss: each of gkd-prompt's batches of 4 labels its prompts too
    [v] = read_result(run_path(outcome.results_dir, "lm__llama__gkd__s0"))["variants"]
    assert 1.0 < v["metric"] < float("inf")

    s2s_gkd = {"name": "gkd", "method": "on_policy", "params": {"lmbda": 1.0, "max_new_tokens": 8}}
    s2s = suite_of(tmp_path, [s2s_gkd], {"name": "s2s", "task": "generated_seq2seq",
                                         "params": {"train_size": 16, "eval_size": 8}},
                   T5_PAIR,
                   training={"max_steps": 2, "batch_size": 8, "max_seq_length": 32},
                   profiling={**FAST_PROFILING, "seq_length": 24})
    outcome = run_suite(s2s, show_progress=False)
    assert [r.status for r in outcome.runs] == ["ok", "ok", "ok"], [r.error for r in outcome.runs]
    assert calls["seq2seq"] == 2

    for params, message in (({}, "method 'gkd': on-policy KD needs a seq2seq or causal LM task; task 'sentiment' "
                                 "has a classification head"),):
        bad = suite_of(tmp_path, [{"name": "gkd", "method": "on_policy", "params": params}],
                       {"name": "sentiment", "task": "generated_sentiment",
                        "params": {"train_size": 32, "transfer_size": 0, "eval_size": 16}},
                       tiny_suite_data(tmp_path, tmp_path, [])["pairs"][0])
        [failed] = run_suite(bad, show_progress=False).failed
        assert failed.error == message and failed.error_kind == "input"
    prompt_on_s2s = suite_of(tmp_path, [{"name": "gkd", "method": "on_policy", "params": {"prompt_length": 4}}],
                             {"name": "s2s", "task": "generated_seq2seq", "params": {"train_size": 16, "eval_size": 8}},
                             T5_PAIR,
                             training={"max_steps": 2, "batch_size": 8, "max_seq_length": 32})
    [failed] = run_suite(prompt_on_s2s, show_progress=False).failed
    assert failed.error == "method 'gkd': prompt_length is for causal LM tasks; task 's2s' has a seq2seq head"
    # refused when bound, before training (the head's own check, at the first written batch, names no method)
    too_long = suite_of(tmp_path, [{"name": "gkd", "method": "on_policy", "params": {"prompt_length": 32}}],
                        {"name": "lm", "task": "generated_lm", "params": {"train_size": 64, "eval_size": 16}},
                        LM_PAIR,
                        training={"max_steps": 3, "batch_size": 4, "max_seq_length": 32})
    [failed] = run_suite(too_long, show_progress=False).failed
    assert failed.error == ("method 'gkd': prompt_length 32 leaves no room to continue within max_seq_length 32"
                            ) and failed.error_kind == "input"
