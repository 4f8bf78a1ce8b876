"""Seq2seq by generation: decoding, exact match and ROUGE-L, and sequence-level KD (the teacher's outputs as
targets), from the head up to a tiny suite."""

import pytest
import torch
import yaml

from kdbench import heads, models
from kdbench.errors import KdbenchError
from kdbench.heads.seq2seq import end_token_id, reference_ids, score_generations
from kdbench.methods import SequenceKD, make_objective
from kdbench.results import read_result, run_path
from kdbench.runner import run_suite
from kdbench.suite import load_suite
from kdbench.tasks import load_task, tasks
from tiny import FAST_PROFILING, T5, save_tiny_bart
from tiny import tiny_t5 as t5



@pytest.fixture(scope="module")
def data():
    return load_task("generated_seq2seq", {"train_size": 40, "eval_size": 10})


@pytest.fixture(scope="module")
def tok(data, tmp_path_factory):
    return models.train_tokenizer(heads.get("seq2seq").texts(data.train), 300, tmp_path_factory.mktemp("tok"))




def greedy_by_hand(model, input_ids, start, eos, steps):
    """Argmax decoding one token at a time, without generate(): the oracle for the head's decoding."""
    out = [start]
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([input_ids]), decoder_input_ids=torch.tensor([out])).logits
            out.append(int(logits[0, -1].argmax()))
            if out[-1] == eos:
                break
    out = out[1:]
    return out[: out.index(eos)] if eos in out else out


def test_generate_is_greedy_decoding_without_the_start_and_end_tokens(data, tok):
    head = heads.get("seq2seq")
    rows = head.encode(data.eval[:5], tok, 32)
    model = t5(tok, seed=3)
    decoded = head.generate(model, rows, tok, "cpu", max_new_tokens=6, batch_size=2)  # padding inside a batch
    eos = end_token_id(tok)
    assert decoded == [greedy_by_hand(model, r["input_ids"], tok.pad_token_id, eos, 6) for r in rows]
    assert all(len(d) <= 6 and eos not in d for d in decoded)


def test_exact_match_and_rouge_l():
    assert score_generations("exact_match", ["Plot positive ", "a b"], ["plot  positive", "a c"]) == 0.5
    # ROUGE-L F1: the longest common subsequence of words, here 5 of 6 on both sides
    assert score_generations("rouge_l", ["the cat sat on the mat"], ["the cat was on the mat"]) == pytest.approx(
        5 / 6, rel=1e-5)
    assert score_generations("rouge_l", ["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)
    assert score_generations("rouge_l", ["completely different"], ["nothing shared here"]) == 0.0


def test_generation_metrics_score_the_decoded_outputs_against_the_references(data, tok):
    """The metric is the decoded output against the reference tokens decoded: a model that emits the
    references scores 1, and the metric of a real model is the score of its greedy outputs."""
    rows = heads.get("seq2seq").encode(data.eval, tok, 32)
    collator = heads.get("seq2seq").collator(tok)
    model = t5(tok, seed=4)
    for metric in ("exact_match", "rouge_l"):
        head = heads.get("seq2seq", metric=metric)
        assert head.higher_is_better and head.metric_name in ("exact match", "ROUGE-L")
        hyps = tok.batch_decode(head.generate(model, rows, tok, "cpu"), skip_special_tokens=True)
        refs = tok.batch_decode([reference_ids(r["labels"], tok) for r in rows], skip_special_tokens=True)
        assert head.evaluate(model, rows, collator, "cpu") == pytest.approx(score_generations(metric, hyps, refs))
        oracle = head.__class__(metric=metric)
        oracle.generate = lambda *a, **k: [reference_ids(r["labels"], tok) for r in rows]
        assert oracle.evaluate(model, rows, collator, "cpu") == 1.0
        perplexity, extra = heads.get("seq2seq").measure(model, rows, collator, "cpu")
        assert perplexity == pytest.approx(heads.get("seq2seq").evaluate(model, rows, collator, "cpu"))
        assert set(extra) == {"token accuracy"}
        assert head.measure(model, rows, collator, "cpu") == (
            pytest.approx(head.evaluate(model, rows, collator, "cpu")),
            {"perplexity": pytest.approx(perplexity), "token accuracy": pytest.approx(extra["token accuracy"])})


def test_seq2seq_tasks_take_the_scoring_settings():
    data = load_task("generated_seq2seq", {"train_size": 4, "eval_size": 2, "metric": "exact_match",
                                           "num_beams": 3})
    assert data.head_params == {"metric": "exact_match", "num_beams": 3, "max_new_tokens": None}
    assert tasks.validate_params("xsum", {}).metric == "rouge_l"  # a summarisation preset scores ROUGE-L
    with pytest.raises(KdbenchError, match=r"params.metric: Input should be 'perplexity', 'exact_match' or"):
        tasks.validate_params("cnn_dailymail", {"metric": "bleu"})


def test_decoded_targets_are_the_teachers_decoded_outputs(data, tok):
    head = heads.get("seq2seq")
    rows = head.encode(data.train[:6], tok, 32)
    teacher = t5(tok, seed=5)
    relabelled = head.decoded_targets(teacher, rows, tok, "cpu", max_len=32, max_new_tokens=8)
    decoded = head.generate(teacher, rows, tok, "cpu", max_new_tokens=8)
    eos = end_token_id(tok)
    for row, new, out in zip(rows, relabelled, decoded):
        assert new["input_ids"] == row["input_ids"] and new["attention_mask"] == row["attention_mask"]
        assert new["labels"] == out + [eos]
        assert new["decoder_input_ids"] == [tok.pad_token_id] + new["labels"][:-1]
    assert [r["labels"] for r in relabelled] != [r["labels"] for r in rows]


def test_sequence_method_defaults_to_pure_sequence_level_kd():
    objective = make_objective("sequence", {"num_beams": 4})
    assert isinstance(objective, SequenceKD) and objective.generates_targets
    assert (objective.params.alpha, objective.params.num_beams, objective.params.keep_references) == (0.0, 4, False)


def tiny_suite(tmp_path, task_params, methods, task="generated_seq2seq", teacher=None, student=None,
               training=None):
    data = {
        "name": "tiny-t5-gen", "device": "cpu", "seeds": [0],
        "tasks": [{"name": "s2s", "task": task, "params": {"train_size": 48, "eval_size": 12, **task_params}}],
        "pairs": [{"name": "t5",
                   "teacher": {"model": teacher or {**T5, "d_model": 16, "d_ff": 32},
                               "finetune": {"max_steps": 2, "batch_size": 8}},
                   "student": {"model": student or {**T5, "d_model": 8, "d_ff": 16}}}],
        "methods": methods,
        "training": {"batch_size": 8, "max_seq_length": 32, **(training or {"max_steps": 2})},
        "profiling": {**FAST_PROFILING, "seq_length": 24, "generate_tokens": 3},
        "output_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return load_suite(tmp_path / "suite.yaml")


def test_a_suite_scored_by_exact_match_with_sequence_level_kd(tmp_path):
    suite = tiny_suite(tmp_path, {"metric": "exact_match", "max_new_tokens": 12},
                       [{"name": "seq-kd", "method": "sequence", "params": {"alpha": 0.5, "max_new_tokens": 10}},
                        {"name": "seq-kd-refs", "method": "sequence", "params": {"keep_references": True}}],
                       training={"epochs": 1})
    outcome = run_suite(suite, show_progress=False)
    assert {r.run_id.split("__", 2)[2]: r.status for r in outcome.runs} == {
        "teacher": "ok", "student__s0": "ok", "seq-kd__s0": "ok", "seq-kd-refs__s0": "ok"}, [
        r.error for r in outcome.runs]
    out = outcome.results_dir
    for run in ("teacher", "student__s0", "seq-kd__s0"):
        [v] = read_result(run_path(out, f"s2s__t5__{run}"))["variants"]
        assert v["metric_name"] == "exact match" and v["higher_is_better"] is True and 0.0 <= v["metric"] <= 1.0
        assert 1.0 < v["extra_metrics"]["perplexity"] < float("inf")
        # decoding latency after the source at the profiling length (an encoder-decoder's source is not cut)
        assert [(g["prompt_tokens"], g["new_tokens"]) for g in v["generation"].values()] == [(24, 3)]
    # one epoch over the teacher's outputs: as many rows as the train split; with the gold pairs too, twice as many
    seq, refs = (read_result(run_path(out, f"s2s__t5__{m}__s0"))["training"] for m in ("seq-kd", "seq-kd-refs"))
    assert (seq["samples"], refs["samples"]) == (48, 96)
    readme = (out / "README.md").read_text()
    header = next(line for line in readme.splitlines() if line.startswith("| pair"))
    assert [c.strip() for c in header.split("|")][5:8] == ["exact match", "retention", "perplexity"]


def test_sequence_level_kd_refuses_a_task_without_decoding_in_one_line(tmp_path):
    from tiny import BERT

    suite = tiny_suite(tmp_path, {"transfer_size": 0}, [{"name": "seq-kd", "method": "sequence"}],
                       task="generated_sentiment", teacher={**BERT, "hidden_size": 16, "intermediate_size": 32},
                       student={**BERT, "hidden_size": 8, "intermediate_size": 16})
    outcome = run_suite(suite, show_progress=False)
    [failed] = outcome.failed
    assert failed.error == ("method 'seq-kd': sequence-level KD needs a seq2seq or causal LM task; task 's2s' has a "
                            "classification head") and failed.error_kind == "input"
    assert outcome.exit_code == 2


def test_a_prompt_length_on_a_seq2seq_task_is_refused_in_one_line(tmp_path):
    suite = tiny_suite(tmp_path, {}, [{"name": "seq-kd", "method": "sequence", "params": {"prompt_length": 4}}])
    outcome = run_suite(suite, show_progress=False)
    [failed] = outcome.failed
    assert failed.error == ("method 'seq-kd': prompt_length is for causal LM tasks; task 's2s' has a seq2seq "
                            "head") and failed.error_kind == "input"


@pytest.fixture(scope="module")
def barts(data, tmp_path_factory):
    """Two local BART-style folders sharing one tokenizer: a 16-wide teacher and an 8-wide student."""
    folder = tmp_path_factory.mktemp("bart")
    texts = heads.get("seq2seq").texts(data.train)
    return (str(save_tiny_bart(folder / "teacher", texts, d_model=16, seed=0)),
            str(save_tiny_bart(folder / "student", texts, d_model=8, seed=1)))


def test_a_bart_pair_trains_on_the_targets_barts_own_recipe_builds(data, barts):
    """BART starts its decoder with </s> and its targets with <s>: the rows are what BART's tokenizer and its own
    shift_tokens_right make of a target, and the model's loss on them is the loss it computes from labels alone."""
    from transformers import BartForConditionalGeneration
    from transformers.models.bart.modeling_bart import shift_tokens_right

    teacher, student = barts
    btok = models.load_tokenizer(teacher)
    head = heads.get("seq2seq")
    options = head.pair_options(teacher, student, btok, "p")
    assert options == {"decoder_start": 2, "target_prefix": [btok.bos_token_id]} and btok.bos_token_id == 0
    rows = head.encode(data.train[:6], btok, 32, **options)
    for row, raw in zip(rows, data.train[:6]):
        assert row["labels"] == btok(raw["target"])["input_ids"]  # <s> target </s>
        assert row["decoder_input_ids"] == shift_tokens_right(torch.tensor([row["labels"]]), 1, 2)[0].tolist()
    model = BartForConditionalGeneration.from_pretrained(teacher).eval()
    batch = head.collator(btok, **options)(rows)
    with torch.no_grad():
        ours = model(**batch).loss
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss
    torch.testing.assert_close(ours, theirs)
    # decoding drops the start token and the <s> that generation forces; sequence-level KD puts <s> back
    outputs = head.generate(model, rows, btok, "cpu", max_new_tokens=6, **options)
    enc = btok.pad([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows], return_tensors="pt")
    raw = model.generate(**enc, max_new_tokens=6, do_sample=False, num_beams=1).tolist()
    assert all(r[:2] == [2, 0] for r in raw)
    assert outputs == [r[2:r.index(2, 1)] if 2 in r[1:] else r[2:] for r in raw]
    relabelled = head.decoded_targets(model, rows, btok, "cpu", max_len=32, max_new_tokens=6, **options)
    for new, out in zip(relabelled, outputs):
        assert new["labels"] == [0, *out, 2] and new["decoder_input_ids"] == [2, 0, *out]


def test_progressive_finds_barts_encoder_and_decoder_layers(barts):
    from transformers import BartForConditionalGeneration

    from kdbench.methods import stack_blocks

    model = BartForConditionalGeneration.from_pretrained(barts[1])
    stacks = stack_blocks(model)
    assert stacks["encoder"] is model.model.encoder.layers and stacks["decoder"] is model.model.decoder.layers


def test_a_pair_whose_decoder_starts_differ_is_refused_in_one_line(data, barts, tmp_path):
    teacher, _ = barts
    odd = str(save_tiny_bart(tmp_path / "odd", heads.get("seq2seq").texts(data.train), d_model=8, decoder_start=1))
    message = ("pair 't5': the teacher starts its decoder with token 2, the student with 1; they are given the same "
               "decoder inputs, so the two must agree")
    with pytest.raises(KdbenchError) as info:
        heads.get("seq2seq").pair_options(teacher, odd, models.load_tokenizer(teacher), "t5")
    assert str(info.value) == message
    # and the runner asks before it trains anything
    outcome = run_suite(tiny_suite(tmp_path, {}, [], teacher=teacher, student=odd), show_progress=False)
    teacher_run, student_run = outcome.failed
    assert teacher_run.error == message and teacher_run.error_kind == "input"
    assert student_run.error == "teacher run s2s__t5__teacher did not succeed; its students cannot run"


def test_a_bart_pair_runs_a_suite_with_generation_metrics_and_sequence_level_kd(barts, tmp_path):
    teacher, student = barts
    suite = tiny_suite(tmp_path, {"metric": "exact_match", "max_new_tokens": 8},
                       [{"name": "kd", "method": "logit", "params": {"temperature": 2.0}},
                        {"name": "seq-kd", "method": "sequence", "params": {"max_new_tokens": 8}},
                        {"name": "prog", "method": "progressive"}],
                       teacher=teacher, student=student)
    outcome = run_suite(suite, show_progress=False)
    assert {r.run_id.split("__", 2)[2]: r.status for r in outcome.runs} == {
        "teacher": "ok", "student__s0": "ok", "kd__s0": "ok", "seq-kd__s0": "ok", "prog__s0": "ok"}, [
        r.error for r in outcome.runs]
    for run in ("teacher", "kd__s0", "seq-kd__s0"):
        [v] = read_result(run_path(outcome.results_dir, f"s2s__t5__{run}"))["variants"]
        assert v["metric_name"] == "exact match" and 0.0 <= v["metric"] <= 1.0
        assert 1.0 < v["extra_metrics"]["perplexity"] < float("inf") and v["generation"]


