"""Sequence-to-sequence tasks: a source text and a target text per row (kdbench.heads.seq2seq: T5- and BART-style
models).

    generated_seq2seq   offline: the quickstart's reviews rewritten as each clause's resolved polarity + verdict
    text_seq2seq        local TSV/CSV/JSON(L) files with source and target columns
    hub_seq2seq         a hub dataset's source and target columns; presets xsum and cnn_dailymail (ROUGE-L)
Every family takes the head's scoring settings: `metric` (perplexity, exact_match, rouge_l), `num_beams`,
`max_new_tokens`.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from kdbench.errors import KdbenchError
from kdbench.heads.generation import Seq2SeqMetric
from kdbench.tasks.base import (
    HubParams, HubTask, LocalParams, LocalTask, SplitsTask, Task, TaskData, TaskParams, preset, tasks,
)
from kdbench.tasks.generated import _NEGATORS, _POSITIVE, FORMS, generate_sentiment_example

# ---------------------------------------------------------------------------------------------------------------
# Generated: read a review, write down what each clause means and which clause decides.


def resolve_review(text: str) -> tuple[list[tuple[str, str]], str]:
    """'the plot was not bad but the music was dull' -> ([('plot', 'positive'), ('music', 'negative')], 'negative').

    Parses a review of kdbench.tasks.generated (clauses 'the NOUN VERB [NEGATOR] [INTENSIFIER] ADJECTIVE' joined by
    'but', 'although ... ,' or ', although'): each clause's polarity after negation, and the deciding clause's.
    """
    if text.startswith("although "):
        first, second = text[len("although "):].split(" , ")
        clauses, decides = [first, second], 1
    elif " , although " in text:
        clauses, decides = text.split(" , although "), 0
    elif " but " in text:
        clauses, decides = text.split(" but "), 1
    else:
        clauses, decides = [text], 0
    resolved = []
    for clause in clauses:
        words = clause.split()
        positive = (words[-1] in _POSITIVE) != any(w in _NEGATORS for w in words)
        resolved.append((words[1], "positive" if positive else "negative"))
    return resolved, resolved[decides][1]


def seq2seq_target(text: str) -> str:
    """The generated task's target: 'plot positive ; music negative => negative'."""
    resolved, verdict = resolve_review(text)
    return " ; ".join(f"{noun} {polarity}" for noun, polarity in resolved) + f" => {verdict}"


class ScoringParams(TaskParams):
    """How the seq2seq head scores a model (kdbench.heads.seq2seq.Seq2Seq)."""

    metric: Seq2SeqMetric = "perplexity"
    num_beams: int = Field(1, ge=1)  # for the generation metrics; 1 is greedy decoding
    max_new_tokens: int | None = Field(None, gt=0)  # default: the longest reference of the eval split

    def head_params(self) -> dict:
        return {"metric": self.metric, "num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens}


@tasks.register("generated_seq2seq")
class GeneratedSeq2Seq(Task):
    """Embedded offline seq2seq task: the quickstart's reviews, rewritten as what each clause says and the verdict.

    source 'the plot was not bad but the music was dull'  ->  target 'plot positive ; music negative => negative'.
    The nouns are copied (any model learns it), each clause's polarity needs negation scope, and the verdict needs
    the contrast rule ('but' and 'although' pick a clause), which a larger model gets right more often. A share
    `label_noise` of the train targets have a wrong verdict (eval stays clean), as in generated_sentiment: a
    teacher's distribution there carries what the noisy labels hide. Scored by target perplexity (default) or by
    the exact match of the decoded target (`metric: exact_match`).
    """

    class Params(ScoringParams):
        train_size: int = Field(3000, gt=0)
        eval_size: int = Field(500, gt=0)
        label_noise: float = Field(0.1, ge=0, lt=0.5)  # train verdicts flipped (eval stays clean)
        forms: list[Literal[FORMS]] = Field(default_factory=lambda: ["single", "but"], min_length=1)
        seed: int = 1234  # fixes the data; independent of the run seeds

    def load(self) -> TaskData:
        p = self.params
        rng = random.Random(p.seed)

        def split(n: int, noise: float = 0.0) -> list[dict]:
            rows = []
            for _ in range(n):
                text, _ = generate_sentiment_example(rng, tuple(p.forms))
                target = seq2seq_target(text)
                if rng.random() < noise:
                    good = target.endswith("positive")
                    target = target.rsplit(" ", 1)[0] + (" negative" if good else " positive")
                rows.append({"source": text, "target": target})
            return rows

        return TaskData(train=split(p.train_size, p.label_noise), eval=split(p.eval_size), head="seq2seq",
                        head_params=p.head_params())


# ---------------------------------------------------------------------------------------------------------------
# Local files and the hub


class _Seq2SeqParams(ScoringParams):
    source_column: str = "source"
    target_column: str = "target"
    prefix: str = ""  # put before every source, e.g. T5's "summarize: "
    max_train: int | None = Field(None, gt=0)  # first N rows (with both texts non-empty)
    max_eval: int | None = Field(None, gt=0)


def _seq2seq_rows(ds, p: _Seq2SeqParams, where: str, limit: int | None) -> list[dict]:
    missing = [c for c in (p.source_column, p.target_column) if c not in ds.column_names]
    if missing:
        raise KdbenchError(f"{where}: no column {missing[0]!r}; columns are: {', '.join(ds.column_names)}")
    rows = [{"source": p.prefix + str(s), "target": str(t)}
            for s, t in zip(ds[p.source_column], ds[p.target_column])
            if s is not None and t is not None and str(s).strip() and str(t).strip()]
    if not rows:
        raise KdbenchError(f"{where}: no row with a non-empty {p.source_column!r} and {p.target_column!r}")
    return rows[:limit]


class _Seq2Seq(SplitsTask):
    """What the file and hub families share: a source and a target column per split."""

    def build(self, train_ds, eval_ds, train_where: str, eval_where: str) -> TaskData:
        p = self.params
        train = _seq2seq_rows(train_ds, p, train_where, p.max_train)
        eval_ = _seq2seq_rows(eval_ds, p, eval_where, p.max_eval)
        return TaskData(train=train, eval=eval_, head="seq2seq", head_params=p.head_params())


@tasks.register("text_seq2seq")
class LocalTextSeq2Seq(_Seq2Seq, LocalTask):
    """Sequence-to-sequence from local TSV/CSV/JSON(L) files with a source and a target column."""

    class Params(_Seq2SeqParams, LocalParams):
        pass


class _HubSeq2Seq(_Seq2Seq, HubTask):
    """Sequence-to-sequence from a hub dataset's source and target columns (needs a network, or the datasets
    cache)."""

    local_task = "text_seq2seq"

    class Params(_Seq2SeqParams, HubParams):
        pass


tasks.register("hub_seq2seq")(_HubSeq2Seq)
preset("xsum", "XSum one-sentence news summaries from the hub (T5's 'summarize: ' prefix).", _HubSeq2Seq,
       dataset="EdinburghNLP/xsum", source_column="document", target_column="summary", prefix="summarize: ",
       metric="rouge_l")
preset("cnn_dailymail", "CNN/DailyMail 3.0.0 news summaries from the hub (T5's 'summarize: ' prefix).", _HubSeq2Seq,
       dataset="abisee/cnn_dailymail", config="3.0.0", source_column="article", target_column="highlights",
       prefix="summarize: ", metric="rouge_l")
