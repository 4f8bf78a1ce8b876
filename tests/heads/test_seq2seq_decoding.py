"""The seq2seq head by generation: greedy decoding, the generation metrics, the teacher's decoded targets for
sequence-level KD, and a BART pair's own decoder start and target prefix."""

import pytest
import torch

from kdbench import heads, models
from kdbench.heads.generation import end_token_id, score_generations
from kdbench.heads.seq2seq import reference_ids
from kdbench.tasks import load_task
from tiny import save_tiny_bart_pair
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


@pytest.fixture(scope="module")
def barts(data, tmp_path_factory):
    return save_tiny_bart_pair(tmp_path_factory.mktemp("bart"), heads.get("seq2seq").texts(data.train))


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
