"""The embedded offline tasks: the generated sentiment task's rules, checked against an independent
re-implementation, and the generated LM task built on it."""

import random

import pytest

from kdbench.errors import KdbenchError
from kdbench.heads import TEACHER_LABEL
from kdbench.tasks import load_task
from kdbench.tasks.generated import (
    _NEGATIVE,
    _NEGATORS,
    _POSITIVE,
    FORMS,
    generate_sentiment_example,
)


def clause_polarity(clause: str) -> int:
    """+1/-1 for 'the plot was [not] [very] good': the adjective's sign, flipped by a negator."""
    words = clause.split()
    adjective = words[-1]
    assert (adjective in _POSITIVE) != (adjective in _NEGATIVE), clause
    sign = 1 if adjective in _POSITIVE else -1
    return -sign if any(w in _NEGATORS for w in words) else sign


def rule_label(text: str) -> int:
    """The task's rules, written independently: in 'A but B' and 'although A , B' B decides; in 'A , although B'
    A does; a single clause decides alone."""
    if text.startswith("although "):
        a, b = text[len("although "):].split(" , ")
        deciding = b
    elif " , although " in text:
        deciding = text.split(" , although ")[0]
    elif " but " in text:
        deciding = text.split(" but ")[1]
    else:
        deciding = text
    return int(clause_polarity(deciding) > 0)


@pytest.mark.parametrize(
    "text, label",
    [
        ("the plot was good", 1),
        ("the plot was not good", 0),
        ("the acting felt never very bad", 1),
        ("the music is hardly charming", 0),
        ("the plot was good but the ending was awful", 0),
        ("the plot was awful but the ending was not bad", 1),
        ("although the cast was great , the script was dull", 0),
        ("although the cast was not great , the script was really fun", 1),
        ("the cast was great , although the script was dull", 1),
        ("the cast was not great , although the script was fun", 0),
    ],
)
def test_rules_on_constructed_examples(text, label):
    assert rule_label(text) == label


def test_generated_labels_follow_the_rules():
    rng = random.Random(0)
    examples = [generate_sentiment_example(rng, FORMS) for _ in range(2000)]
    for text, label in examples:
        assert label == rule_label(text), text
    # The rules are exercised, not trivially satisfied: every form occurs, negators occur, and clauses disagree
    # often enough that a bag of words cannot tell the label.
    assert any(" but " in t for t, _ in examples)
    assert any(t.startswith("although ") for t, _ in examples)
    assert any(" , although " in t for t, _ in examples)
    assert any(any(f" {n} " in t for n in _NEGATORS) for t, _ in examples)
    disagree = [t for t, _ in examples if " but " in t and len({clause_polarity(c) for c in t.split(" but ")}) == 2]
    assert len(disagree) > 100
    assert {label for _, label in examples} == {0, 1}


def test_forms_restrict_the_structure():
    rng = random.Random(1)
    texts = [generate_sentiment_example(rng, ("single",))[0] for _ in range(200)]
    assert not any(" but " in t or "although" in t for t in texts)


def sentiment(**params):
    return load_task("generated_sentiment", {"train_size": 300, "transfer_size": 50, "eval_size": 200, **params})


def test_generated_sentiment_is_deterministic_for_a_seed():
    a, b = sentiment(seed=7), sentiment(seed=7)
    assert (a.train, a.transfer, a.eval) == (b.train, b.transfer, b.eval)
    c = sentiment(seed=8)
    assert [r["text"] for r in c.train] != [r["text"] for r in a.train]


def test_generated_sentiment_splits():
    data = sentiment(label_noise=0.2, forms=["single", "but", "although_first", "although_second"])
    assert (len(data.train), len(data.transfer), len(data.eval)) == (300, 50, 200)
    assert data.label_names == ["negative", "positive"] and data.num_labels == 2
    assert data.head == "classification"
    # The transfer set is unlabelled: the teacher labels it during distillation.
    assert {r["label"] for r in data.transfer} == {TEACHER_LABEL}
    # Eval stays clean; train carries the requested share of flipped labels.
    assert all(r["label"] == rule_label(r["text"]) for r in data.eval)
    flipped = sum(r["label"] != rule_label(r["text"]) for r in data.train) / len(data.train)
    assert 0.1 < flipped < 0.3
    clean = sentiment(label_noise=0.0)
    assert all(r["label"] == rule_label(r["text"]) for r in clean.train)


def test_generated_sentiment_params_are_validated():
    with pytest.raises(KdbenchError, match=r"task 'generated_sentiment': params.forms"):
        sentiment(forms=["sarcasm"])
    with pytest.raises(KdbenchError, match=r"params.label_noise"):
        sentiment(label_noise=0.5)


def test_generated_lm_is_reviews_with_their_verdicts():
    data = load_task("generated_lm", {"train_size": 40, "eval_size": 10, "seed": 7})
    assert (len(data.train), len(data.eval), data.head, data.transfer) == (40, 10, "causal_lm", [])
    for row in data.train + data.eval:
        review, verdict = row["text"].split(" => ")
        assert verdict == ("negative", "positive")[rule_label(review)]
    assert load_task("generated_lm", {"train_size": 40, "eval_size": 10, "seed": 7}).train == data.train
