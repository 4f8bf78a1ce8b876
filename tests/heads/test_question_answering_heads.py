"""Question-answering heads: multiple choice and extractive against transformers' own losses, the Distiller's
KD terms, answer spans, SQuAD's normalisation, span decoding, and loading a saved QA model through the head."""

import pytest
import torch
from transformers import BertConfig, BertForMultipleChoice, BertForQuestionAnswering

from kdbench import heads, models
from kdbench.heads import TEACHER_LABEL
from kdbench.heads.question_answering import (
    answer_token_span,
    best_over_golds,
    best_spans,
    exact_match,
    f1_score,
    normalize_answer,
)
from kdbench.kernels import kd_loss
from kdbench.methods.base import DistillationConfig
from kdbench.methods.logit import LogitKD
from kdbench.suite import TrainingSettings
from kdbench.tasks import load_task
from kdbench.train.distiller import Distiller
from kdbench.train.loop import training_arguments

SPANS = load_task("generated_qa", {"train_size": 24, "transfer_size": 4, "eval_size": 8, "seed": 3})


CHOICES = load_task("generated_multiple_choice", {"train_size": 24, "transfer_size": 4, "eval_size": 8, "seed": 3})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [r["text"] for r in SPANS.train + CHOICES.train] + ["squad is a reading comprehension benchmark"]
    return models.train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))


def bert(tok, cls, seed=0, **kw):
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, **kw)
    torch.manual_seed(seed)
    return cls(config)


def distiller(student, teacher, head, tmp_path, **config):
    args = training_arguments(TrainingSettings(max_steps=1, batch_size=4), seed=0, device="cpu",
                              output_dir=str(tmp_path))
    return Distiller(model=student, args=args, teacher=teacher, objective=LogitKD(DistillationConfig(**config)),
                     head=head)


def test_multiple_choice_batches_are_b_by_c_by_l_and_the_loss_is_transformers(tok):
    head = heads.get("multiple_choice")
    rows = head.encode(CHOICES.train[:6], tok, 48)
    batch = head.collator(tok)(rows)
    assert batch["input_ids"].shape[:2] == (6, 4) and batch["labels"].tolist() == [r["label"] for r in
                                                                                   CHOICES.train[:6]]
    lengths = [len(ids) for r in rows for ids in r["input_ids"]]
    assert batch["input_ids"].shape[2] == max(lengths) and min(lengths) < max(lengths)  # padded, right side
    assert batch["attention_mask"].sum().item() == sum(lengths)
    model = bert(tok, BertForMultipleChoice).eval()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (6, 4)
    torch.testing.assert_close(head.hard_loss(head.logits(out), batch["labels"]), out.loss, rtol=1e-5, atol=1e-6)


def test_multiple_choice_kd_is_kd_loss_over_the_choices_and_transfer_rows_take_the_teacher_answer(tok, tmp_path):
    head = heads.get("multiple_choice")
    rows = head.encode(CHOICES.train[:3] + CHOICES.transfer[:2], tok, 48)
    assert [r["labels"] for r in rows][3:] == [TEACHER_LABEL] * 2
    teacher, student = bert(tok, BertForMultipleChoice, 1).eval(), bert(tok, BertForMultipleChoice, 2).eval()
    trainer = distiller(student, teacher, head, tmp_path, temperature=2.0, alpha=0.6)
    batch = head.collator(tok)(rows)
    loss = trainer.compute_loss(student, dict(batch))
    student.eval()
    with torch.no_grad():
        s, t = student(**{k: v for k, v in batch.items() if k != "labels"}).logits, teacher(
            **{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = torch.cat([batch["labels"][:3], t[3:].argmax(-1)])
    torch.testing.assert_close(loss.detach(), kd_loss(s, t, labels, temperature=2.0, alpha=0.6), rtol=1e-5,
                               atol=1e-6)


def test_multiple_choice_collator_carries_cached_teacher_logits(tok):
    head = heads.get("multiple_choice")
    rows = [{**r, "teacher_logits": [0.5, 1.0, -1.0, 2.0]} for r in head.encode(CHOICES.train[:2], tok, 48)]
    batch = head.collator(tok)([{k: v for k, v in r.items() if k != "labels"} for r in rows])
    assert "labels" not in batch and batch["teacher_logits"].shape == (2, 4)


def test_answer_spans_on_constructed_examples(tok):
    head = heads.get("extractive_qa")
    context = "the plot was not good but the music was great"
    rows = [{"question": q, "context": context, "answers": {"text": [a], "answer_start": [context.index(a)]}}
            for q, a in (("what was great ?", "the music"), ("how was the plot ?", "not good"),
                         ("what was the last word ?", "great"))]
    enc = head.encode(rows, tok, 64)
    for r, row in zip(enc, rows):
        s, e = r["labels"]
        assert tok.decode(r["input_ids"][s : e + 1]) == row["answers"]["text"][0]
        assert r["offsets"][0] is None and r["offsets"][1] is None  # CLS and the question are not context
        assert r["context"][r["offsets"][s][0] : r["offsets"][e][1]] == row["answers"]["text"][0]
    # a context cut by truncation: an answer still inside keeps its span, one cut away points at CLS
    short = head.encode(rows, tok, 14)
    assert len(short[0]["input_ids"]) == 14
    assert short[1]["labels"] != [0, 0] and tok.decode(
        short[1]["input_ids"][short[1]["labels"][0] : short[1]["labels"][1] + 1]) == "not good"
    assert short[0]["labels"] == [0, 0] and short[2]["labels"] == [0, 0]
    # a question longer than half the sequence is cut, so the context keeps its half
    long_q = head.encode([{**rows[1], "question": "how " * 40 + "was the plot ?"}], tok, 16)[0]
    assert sum(o is not None for o in long_q["offsets"]) == 16 - 8 - 3  # CLS, question, SEP, context, SEP


def test_answer_token_span_edges():
    offsets = [None, None, None, (0, 3), (4, 8), (8, 10), (11, 14), None]  # "the plot ## was"-like pieces
    assert answer_token_span(offsets, 4, 10) == (4, 5)  # a word of two pieces
    assert answer_token_span(offsets, 5, 7) == (4, 4)  # inside one token
    assert answer_token_span(offsets, 11, 14) == (6, 6)
    assert answer_token_span(offsets, 11, 20) == (0, 0)  # runs past the kept context
    assert answer_token_span([None, None], 0, 1) == (0, 0)


@pytest.mark.parametrize("prediction, gold, em, f1", [
    ("The Music!", "the music", 1.0, 1.0),
    ("an apple", "apple", 1.0, 1.0),
    ("  Denver   Broncos ", "Denver Broncos", 1.0, 1.0),
    ("the music was great", "the music", 0.0, 2 * (1 / 3) * 1 / (1 / 3 + 1)),  # 1 of 3 predicted tokens, recall 1
    ("plot", "the music", 0.0, 0.0),
    ("the", "a", 1.0, 1.0),  # both normalise to nothing
    ("the", "music", 0.0, 0.0),
    ("1,000 years", "1000 years", 1.0, 1.0),
])
def test_squad_normalisation_and_scores(prediction, gold, em, f1):
    assert exact_match(prediction, gold) == em
    assert f1_score(prediction, gold) == pytest.approx(f1)


def test_scores_take_the_best_gold_answer():
    assert normalize_answer("The  Denver-Broncos.") == "denverbroncos"
    assert best_over_golds(f1_score, "Denver Broncos", ["Broncos", "Denver Broncos", "the Broncos"]) == 1.0
    assert best_over_golds(exact_match, "Broncos team", ["Denver Broncos"]) == 0.0
    assert best_over_golds(f1_score, "x", []) == 0.0


def test_decoding_picks_the_best_valid_span():
    start = torch.tensor([[9.0, 1.0, 5.0, 0.0, 2.0, 0.0]])
    end = torch.tensor([[9.0, 4.0, 0.0, 0.0, 3.0, 8.0]])
    valid = torch.tensor([[False, True, True, True, True, False]])  # CLS and the last token are not context
    assert best_spans(start, end, valid).tolist() == [[2, 4]]  # not (0, 0) (CLS), not (2, 1) (end before start)
    assert best_spans(start, end, valid, max_tokens=2).tolist() == [[1, 1]]  # 2..4 is three tokens: 1+4 beats 5+0
    assert best_spans(start, end, torch.zeros_like(valid)).tolist() == [[0, 0]]
    start, end = torch.zeros(1, 40), torch.zeros(1, 40)
    start[0, 2], end[0, 39] = 5.0, 6.0  # 2..39 is 38 tokens: the best span of at most 30 ends at 39
    assert best_spans(start, end, torch.ones(1, 40, dtype=torch.bool)).tolist() == [[10, 39]]


def test_extractive_hard_loss_is_transformers_and_kd_is_over_start_and_end_rows(tok, tmp_path):
    head = heads.get("extractive_qa")
    rows = head.encode(SPANS.train[:3] + SPANS.transfer[:2], tok, 48)
    batch = head.collator(tok)(rows)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    teacher, student = bert(tok, BertForQuestionAnswering, 1).eval(), bert(tok, BertForQuestionAnswering, 2).eval()
    labelled = batch["labels"][:3]
    with torch.no_grad():
        out = student.eval()(**{k: v[:3] for k, v in inputs.items()}, start_positions=labelled[:, 0],
                             end_positions=labelled[:, 1])
    torch.testing.assert_close(head.hard_loss(head.logits(out), labelled), out.loss, rtol=1e-5, atol=1e-6)

    trainer = distiller(student, teacher, head, tmp_path, temperature=2.0, alpha=0.6)
    loss = trainer.compute_loss(student, dict(batch))
    student.eval()
    with torch.no_grad():
        s, t = student(**inputs), teacher(**inputs)
    # transfer rows: the teacher's argmax start and end
    labels = torch.cat([batch["labels"][:3], torch.stack([t.start_logits[3:].argmax(-1),
                                                          t.end_logits[3:].argmax(-1)], -1)])
    expected = kd_loss(torch.cat([s.start_logits, s.end_logits]), torch.cat([t.start_logits, t.end_logits]),
                       torch.cat([labels[:, 0], labels[:, 1]]), temperature=2.0, alpha=0.6)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    mean_of_two = (kd_loss(s.start_logits, t.start_logits, labels[:, 0], temperature=2.0, alpha=0.6)
                   + kd_loss(s.end_logits, t.end_logits, labels[:, 1], temperature=2.0, alpha=0.6)) / 2
    torch.testing.assert_close(loss.detach(), mean_of_two, rtol=1e-5, atol=1e-6)


def test_extractive_evaluate_scores_decoded_spans(tok):
    """A model that puts its start and end scores on the gold tokens scores F1 = 1; one pointing one token late
    scores less; rows are decoded in batches of any size."""
    head = heads.get("extractive_qa")
    rows = head.encode(SPANS.eval, tok, 64)

    class Oracle(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.shift = shift

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            start, end = torch.zeros(input_ids.shape), torch.zeros(input_ids.shape)
            for j, ids in enumerate(input_ids.tolist()):
                r = next(r for r in rows if r["input_ids"] == ids[: len(r["input_ids"])]
                         and sum(attention_mask[j]) == len(r["input_ids"]))
                start[j, r["labels"][0] + self.shift] = end[j, r["labels"][1] + self.shift] = 10.0
            return type("Out", (), {"start_logits": start, "end_logits": end})()

    assert head.evaluate(Oracle(0), rows, head.collator(tok), "cpu", batch_size=3) == pytest.approx(1.0)
    assert head.evaluate(Oracle(1), rows, head.collator(tok), "cpu", batch_size=5) < 0.9


@pytest.mark.parametrize("kind, cls", [("extractive_qa", BertForQuestionAnswering),
                                       ("multiple_choice", BertForMultipleChoice)])
def test_a_saved_qa_model_loads_through_the_heads_auto_class(tok, tmp_path, kind, cls):
    """The hub code path (from_pretrained on the head's Auto class) on a local folder, as a user's download."""
    saved = bert(tok, cls, 5).eval()
    saved.save_pretrained(str(tmp_path / "m"))
    tok.save_pretrained(str(tmp_path / "m"))
    head = heads.get(kind)
    loaded = models.build_model(str(tmp_path / "m"), head=head, num_labels=0, vocab_size=len(tok), seed=0).eval()
    assert type(loaded) is cls
    assert models.pair_tokenizer(str(tmp_path / "m"), str(tmp_path / "m"), [], tmp_path, "k").get_vocab() == \
        tok.get_vocab()
    data = SPANS.train[:2] if kind == "extractive_qa" else CHOICES.train[:2]
    batch = head.collator(tok)(head.encode(data, tok, 48))
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(head.logits(loaded(**batch)), head.logits(saved(**batch)))
