"""Question answering: extractive (SQuAD) and multiple choice (CommonsenseQA), generated, from local files, or the hub.

Rows (the heads in kdbench.heads.question_answering read them):
    extractive_qa     question, context, answers {text: [...], answer_start: [...]} (SQuAD's format, flattened)
    multiple_choice   question, choices (C strings), label (the right choice's index)
Every row also has a `text` (the question with its context or choices): the words a pair's own WordPiece tokenizer
is trained on (kdbench.models.pair_tokenizer). Transfer-set rows have no answer (empty `answers`, or label
TEACHER_LABEL): the teacher labels them for the student.
"""

from __future__ import annotations

import random
import string
from typing import Literal

from pydantic import Field, model_validator

from kdbench.errors import KdbenchError
from kdbench.heads.base import TEACHER_LABEL
from kdbench.tasks.base import (
    HubParams, HubTask, LocalParams, LocalTask, SplitsTask, Task, TaskData, TaskParams, preset, tasks,
)
from kdbench.tasks.generated import _INTENSIFIERS, _NEGATIVE, _NEGATORS, _NOUNS, _POSITIVE

# ---------------------------------------------------------------------------------------------------------------
# Generated reviews with questions about them (offline, fixed by seed)


def generate_qa_example(rng: random.Random, min_clauses: int = 2, max_clauses: int = 4,
                        num_choices: int = 4) -> dict:
    """A review of a few noun phrases, all of one polarity but one; a question about the odd one out.

    'not bad plot , dull music but really weak acting'
        'how was the best part ?'         -> 'not bad'   (the one positive phrase, from its negator or intensifier on)
        'what did the critic like ?'      -> 'plot'      (its noun)
    and, when one phrase is negative among positive ones, 'how was the worst part ?' / 'what did the critic
    dislike ?'. A phrase's polarity is its adjective's, flipped by a negator (the quickstart's negation scope), so no
    word of the question appears in the review: the model must read every phrase's polarity and mark the odd one.
    Measured with the QA quickstart's sizes: a 2-layer, 64-wide BERT learns the 'how' questions (F1 about 0.85 after
    640 steps) while a 1-layer, 32-wide one gets about 0.65; the 'what' questions stay near chance (about 0.33) for
    both at these budgets. `distractors`: num_choices - 1 wrong answers of the same kind, the review's others first.
    """
    n = rng.randint(min_clauses, max_clauses)
    liked = rng.random() < 0.5  # asks for the one positive phrase among negative ones, or the reverse
    odd = rng.randrange(n)
    nouns = rng.sample(_NOUNS, n)
    pools = {1: rng.sample(_POSITIVE, len(_POSITIVE)), -1: rng.sample(_NEGATIVE, len(_NEGATIVE))}
    predicates = []
    for k in range(n):
        polarity = 1 if (k == odd) == liked else -1
        negated = rng.random() < 0.4
        adjective = pools[-polarity if negated else polarity].pop()  # distinct within a review
        predicates.append(" ".join(([rng.choice(_NEGATORS)] if negated else [])
                                   + ([rng.choice(_INTENSIFIERS)] if rng.random() < 0.3 else []) + [adjective]))
    context, starts = "", []  # (predicate start, noun start) per phrase
    for k, (predicate, noun) in enumerate(zip(predicates, nouns)):
        if k:
            context += rng.choice((" , ", " and ", " but "))
        starts.append((len(context), len(context) + len(predicate) + 1))
        context += f"{predicate} {noun}"
    noun, predicate = nouns[odd], predicates[odd]
    if rng.random() < 0.5:
        question = f"what did the critic {'like' if liked else 'dislike'} ?"
        answer, start = noun, starts[odd][1]
        pool = [w for w in nouns if w != noun] + [w for w in _NOUNS if w not in nouns]
    else:
        question = f"how was the {'best' if liked else 'worst'} part ?"
        answer, start = predicate, starts[odd][0]
        pool = [w for w in predicates if w != predicate] + pools[1] + pools[-1]
    assert context[start : start + len(answer)] == answer
    own = pool[: n - 1]
    distractors = (own + rng.sample(pool[n - 1 :], max(num_choices - 1 - len(own), 0)))[: num_choices - 1]
    return {"context": context, "question": question, "answer": answer, "answer_start": start,
            "distractors": distractors}


class _GeneratedQAParams(TaskParams):
    train_size: int = Field(2000, gt=0)  # questions with gold answers
    transfer_size: int = Field(4000, ge=0)  # questions without, which the teacher answers for the student
    eval_size: int = Field(500, gt=0)
    min_clauses: int = Field(2, ge=1, le=len(_NOUNS))
    max_clauses: int = Field(4, ge=1, le=len(_NOUNS))
    seed: int = 1234  # fixes the data; independent of the run seeds

    @model_validator(mode="after")
    def _clauses_in_order(self):
        if self.min_clauses > self.max_clauses:
            raise ValueError("min_clauses must be <= max_clauses")
        return self


@tasks.register("generated_qa")
class GeneratedQA(Task):
    """Embedded offline extractive QA: questions about generated reviews, answered by a span (the QA quickstart)."""

    class Params(_GeneratedQAParams):
        pass

    def load(self) -> TaskData:
        p = self.params
        rng = random.Random(p.seed)

        def split(size: int, labelled: bool = True) -> list[dict]:
            rows = []
            for _ in range(size):
                ex = generate_qa_example(rng, p.min_clauses, p.max_clauses)
                answers = {"text": [ex["answer"]], "answer_start": [ex["answer_start"]]} if labelled else {
                    "text": [], "answer_start": []}
                rows.append(_span_row(ex["question"], ex["context"], answers))
            return rows

        return TaskData(train=split(p.train_size), transfer=split(p.transfer_size, labelled=False),
                        eval=split(p.eval_size), head="extractive_qa")


@tasks.register("generated_multiple_choice")
class GeneratedMultipleChoice(Task):
    """Embedded offline multiple choice: generated_qa's questions, with the answer among `num_choices` choices."""

    class Params(_GeneratedQAParams):
        num_choices: int = Field(4, ge=2, le=8)

    def load(self) -> TaskData:
        p = self.params
        rng = random.Random(p.seed)

        def split(size: int, labelled: bool = True) -> list[dict]:
            rows = []
            for _ in range(size):
                ex = generate_qa_example(rng, p.min_clauses, p.max_clauses, p.num_choices)
                choices = ex["distractors"] + [ex["answer"]]
                rng.shuffle(choices)
                label = choices.index(ex["answer"]) if labelled else TEACHER_LABEL
                rows.append(_choice_row(f"{ex['context']} . {ex['question']}", choices, label))
            return rows

        return TaskData(train=split(p.train_size), transfer=split(p.transfer_size, labelled=False),
                        eval=split(p.eval_size), label_names=[str(i) for i in range(p.num_choices)],
                        head="multiple_choice")


# ---------------------------------------------------------------------------------------------------------------
# What the file and hub families share


class _QAParams(TaskParams):
    max_train: int | None = Field(None, gt=0)  # take the first N rows (after a seeded shuffle)
    max_eval: int | None = Field(None, gt=0)
    transfer_from_train: int = Field(0, ge=0)  # hold out N train rows, without their answers, as the transfer set
    shuffle_seed: int = 0


def _span_row(question: str, context: str, answers: dict) -> dict:
    return {"text": f"{question} {context}", "question": question, "context": context, "answers": answers}


def _choice_row(question: str, choices: list[str], label: int) -> dict:
    return {"text": " ".join([question, *choices]), "question": question, "choices": choices, "label": label}


def _check_columns(ds, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise KdbenchError(f"{where}: no column {missing[0]!r}; columns are: {', '.join(ds.column_names)}")


def _split_rows(train: list[dict], eval_: list[dict], p: _QAParams, where: str, head: str, unlabel) -> TaskData:
    random.Random(p.shuffle_seed).shuffle(train)
    transfer = [unlabel(r) for r in train[: p.transfer_from_train]]
    train = train[p.transfer_from_train :][: p.max_train]
    eval_ = eval_[: p.max_eval]
    if not train or not eval_:
        raise KdbenchError(f"{where}: empty {'train' if not train else 'eval'} split")
    num_choices = len(train[0]["choices"]) if head == "multiple_choice" else 0
    return TaskData(train=train, eval=eval_, transfer=transfer, head=head,
                    label_names=[str(i) for i in range(num_choices)])


# ---------------------------------------------------------------------------------------------------------------
# Extractive QA (SQuAD format)


class _SpanParams(_QAParams):
    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = "answers"  # {text: [...], answer_start: [...]} per row


def _span_rows(ds, p: _SpanParams, where: str, split: str) -> list[dict]:
    _check_columns(ds, [p.question_column, p.context_column, p.answers_column], where)
    rows = []
    for i, r in enumerate(ds):
        question, context, answers = str(r[p.question_column]), str(r[p.context_column]), r[p.answers_column]
        if not isinstance(answers, dict) or not {"text", "answer_start"} <= set(answers):
            raise KdbenchError(f"{where}: {split} row {i}: column {p.answers_column!r} must be "
                               f"{{text: [...], answer_start: [...]}}, got {str(answers)[:80]}")
        texts, starts = [str(t) for t in answers["text"]], [int(s) for s in answers["answer_start"]]
        if not texts or len(texts) != len(starts):
            raise KdbenchError(f"{where}: {split} row {i}: needs at least one answer, with one answer_start each")
        for t, s in zip(texts, starts):
            if context[s : s + len(t)] != t:
                raise KdbenchError(f"{where}: {split} row {i}: answer {t!r} is not at answer_start {s} of its context")
        rows.append(_span_row(question, context, {"text": texts, "answer_start": starts}))
    return rows


def _no_answers(row: dict) -> dict:
    return {**row, "answers": {"text": [], "answer_start": []}}


class _ExtractiveQA(SplitsTask):
    """What the file and hub families share: SQuAD-format rows per split."""

    def build(self, train_ds, eval_ds, train_where: str, eval_where: str) -> TaskData:
        p = self.params
        train = _span_rows(train_ds, p, train_where, "train")
        eval_ = _span_rows(eval_ds, p, eval_where, "eval")
        return _split_rows(train, eval_, p, train_where, "extractive_qa", _no_answers)


@tasks.register("extractive_qa")
class LocalExtractiveQA(_ExtractiveQA, LocalTask):
    """Extractive QA from local JSON(L) files in SQuAD's flattened format: question, context,
    answers {text: [...], answer_start: [...]} per row (HF datasets' `squad` layout)."""

    class Params(_SpanParams, LocalParams):
        format: Literal["auto", "json"] = "auto"


class _HubExtractiveQA(_ExtractiveQA, HubTask):
    """Extractive QA from a hub dataset in SQuAD's format (needs a network, or the datasets cache)."""

    local_task = "extractive_qa"

    class Params(_SpanParams, HubParams):
        pass


tasks.register("hub_extractive_qa")(_HubExtractiveQA)
preset("squad", "SQuAD v1.1 extractive QA from the hub.", _HubExtractiveQA, dataset="rajpurkar/squad")


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice


class _ChoiceParams(_QAParams):
    question_column: str = "question"
    # Either one column holding the choices (a list of strings, or {label: [...], text: [...]} as CommonsenseQA),
    # or one column per choice (SWAG's ending0..ending3, for CSV/TSV files).
    choices_column: str | None = "choices"
    choice_columns: list[str] | None = Field(None, min_length=2)
    # The right choice: its index (0-based, an int or a digit string) or its label ('B': CommonsenseQA's letters,
    # or A, B, C, ... in order for plain lists).
    label_column: str = "label"

    @model_validator(mode="after")
    def _one_way_to_the_choices(self):
        if self.choice_columns:
            self.choices_column = None
        elif not self.choices_column:
            raise ValueError("set choices_column or choice_columns")
        return self


def _choice_index(value, labels: list[str]) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < len(labels) else None
    s = str(value).strip()
    if s in labels:
        return labels.index(s)
    return int(s) if s.isdigit() and int(s) < len(labels) else None


def _choice_rows(ds, p: _ChoiceParams, where: str, split: str, drop_unlabelled: bool = False) -> list[dict]:
    _check_columns(ds, [p.question_column, *(p.choice_columns or [p.choices_column]), p.label_column], where)
    rows = []
    for i, r in enumerate(ds):
        if p.choice_columns:
            choices, labels = [str(r[c]) for c in p.choice_columns], None
        else:
            raw = r[p.choices_column]
            if isinstance(raw, dict) and "text" in raw:
                choices, labels = [str(t) for t in raw["text"]], [str(x) for x in raw.get("label") or []] or None
            elif isinstance(raw, list):
                choices, labels = [str(t) for t in raw], None
            else:
                raise KdbenchError(f"{where}: {split} row {i}: column {p.choices_column!r} must be a list of choices "
                                   f"or {{label: [...], text: [...]}}, got {str(raw)[:80]}")
        labels = labels or list(string.ascii_uppercase[: len(choices)])
        if len(choices) < 2:
            raise KdbenchError(f"{where}: {split} row {i}: needs at least 2 choices, has {len(choices)}")
        value = r[p.label_column]
        if drop_unlabelled and (value is None or str(value).strip() in ("", "-1")):
            continue  # hub test splits hide their answers
        index = _choice_index(value, labels)
        if index is None:
            raise KdbenchError(f"{where}: {split} row {i}: answer {value!r} is not a choice index "
                               f"(0..{len(choices) - 1}) or label ({', '.join(labels)})")
        rows.append(_choice_row(str(r[p.question_column]), choices, index))
    sizes = {len(r["choices"]) for r in rows}
    if len(sizes) > 1:
        first = len(rows[0]["choices"])
        i = next(i for i, r in enumerate(rows) if len(r["choices"]) != first)
        raise KdbenchError(f"{where}: {split} row {i} has {len(rows[i]['choices'])} choices, row 0 has {first}; "
                           "every row needs the same number")
    return rows


def _unlabelled(row: dict) -> dict:
    return {**row, "label": TEACHER_LABEL}


def _same_choice_count(data: TaskData, where: str) -> TaskData:
    c_train, c_eval = len(data.train[0]["choices"]), len(data.eval[0]["choices"])
    if c_train != c_eval:
        raise KdbenchError(f"{where}: train rows have {c_train} choices, eval rows {c_eval}")
    return data


class _MultipleChoice(SplitsTask):
    """What the file and hub families share: a question, its choices and the answer per row (hub test splits,
    which hide their answers, lose their unlabelled rows)."""

    def build(self, train_ds, eval_ds, train_where: str, eval_where: str) -> TaskData:
        p = self.params
        train = _choice_rows(train_ds, p, train_where, "train", drop_unlabelled=self.from_hub)
        eval_ = _choice_rows(eval_ds, p, eval_where, "eval", drop_unlabelled=self.from_hub)
        data = _split_rows(train, eval_, p, train_where, "multiple_choice", _unlabelled)
        return _same_choice_count(data, train_where)


@tasks.register("multiple_choice")
class LocalMultipleChoice(_MultipleChoice, LocalTask):
    """Multiple choice from local JSON(L)/CSV/TSV files: a question, its choices (a list column, or one column per
    choice), and the right choice's index or label."""

    class Params(_ChoiceParams, LocalParams):
        pass


class _HubMultipleChoice(_MultipleChoice, HubTask):
    """Multiple choice from a hub dataset (needs a network, or the datasets cache)."""

    local_task = "multiple_choice"

    class Params(_ChoiceParams, HubParams):
        pass


tasks.register("hub_multiple_choice")(_HubMultipleChoice)
preset("commonsense_qa", "CommonsenseQA (5 choices) from the hub.", _HubMultipleChoice, dataset="tau/commonsense_qa",
       label_column="answerKey")
