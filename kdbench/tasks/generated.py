"""The embedded offline tasks: generated, fixed by seed, no files and no network (the quickstart's)."""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from kdbench.heads.base import TEACHER_LABEL
from kdbench.tasks.base import Task, TaskData, TaskParams, tasks
from kdbench.tasks.language_modeling import ObjectiveParams

# The quickstart: sentiment whose label hinges on negation scope and contrast clauses.

_POSITIVE = "good great excellent fine lovely superb brilliant charming solid fun".split()
_NEGATIVE = "bad awful poor dull terrible boring weak messy bland clumsy".split()
_NOUNS = "movie film plot acting cast script ending music story pacing".split()
_INTENSIFIERS = "very really quite truly".split()
_NEGATORS = "not never hardly".split()


def _clause(rng: random.Random) -> tuple[str, int]:
    """'the plot was not very good' -> (text, polarity +1/-1). A negator flips the adjective."""
    polarity = rng.choice((1, -1))
    adjective = rng.choice(_POSITIVE if polarity > 0 else _NEGATIVE)
    words = ["the", rng.choice(_NOUNS), rng.choice(("was", "is", "felt", "seemed"))]
    if rng.random() < 0.5:
        words.append(rng.choice(_NEGATORS))
        polarity = -polarity
    if rng.random() < 0.4:
        words.append(rng.choice(_INTENSIFIERS))
    words.append(adjective)
    return " ".join(words), polarity


FORMS = ("single", "but", "although_first", "although_second")


def generate_sentiment_example(rng: random.Random, forms: tuple[str, ...] = FORMS) -> tuple[str, int]:
    """One review whose label hinges on structure, not on word counts.

    - negation scope: a negator flips the adjective after it ('not bad' is positive);
    - contrast: in 'A but B' and 'although A , B' the second clause decides; in 'A , although B' the first does.
    A bag of words cannot separate these; a model must read order, which a larger model learns faster.
    """
    a, pa = _clause(rng)
    form = rng.choice(forms)
    if form == "single":
        return a, int(pa > 0)
    b, pb = _clause(rng)
    if form == "but":
        text, pol = f"{a} but {b}", pb
    elif form == "although_first":
        text, pol = f"although {a} , {b}", pb
    else:
        text, pol = f"{a} , although {b}", pa
    return text, int(pol > 0)


@tasks.register("generated_sentiment")
class GeneratedSentiment(Task):
    """Embedded offline sentiment task with negation and contrast clauses (the quickstart)."""

    class Params(TaskParams):
        train_size: int = Field(2000, gt=0)  # labelled examples (the teacher's and the student's gold labels)
        transfer_size: int = Field(8000, ge=0)  # unlabelled inputs the teacher labels for distillation
        eval_size: int = Field(1000, gt=0)
        label_noise: float = Field(0.1, ge=0, lt=0.5)  # flipped gold labels in train (eval stays clean)
        forms: list[Literal[FORMS]] = Field(default_factory=lambda: ["single", "but"], min_length=1)
        seed: int = 1234  # fixes the data; independent of the run seeds

    def load(self) -> TaskData:
        p = self.params
        rng = random.Random(p.seed)

        def split(n: int, noise: float = 0.0, labelled: bool = True) -> list[dict]:
            rows = []
            for _ in range(n):
                text, label = generate_sentiment_example(rng, tuple(p.forms))
                if rng.random() < noise:
                    label = 1 - label
                rows.append({"text": text, "label": label if labelled else TEACHER_LABEL})
            return rows

        return TaskData(
            train=split(p.train_size, p.label_noise),
            transfer=split(p.transfer_size, labelled=False),
            eval=split(p.eval_size),
            label_names=["negative", "positive"],
        )


@tasks.register("generated_lm")
class GeneratedLM(Task):
    """Embedded offline language-modelling task: the quickstart's reviews, each followed by its verdict.

    'the plot was not bad but the music was dull => negative'. Most tokens follow a small grammar that any
    model learns; the verdict depends on negation and contrast, which a larger model gets right more often, so
    the teacher's predictive distribution there is worth distilling. Scored by perplexity on held-out reviews.
    `objective: masked` trains masked LMs (BERT's masked tokens) on the same texts instead of causal ones;
    `verdict: false` leaves the verdicts out: the sentiment task's kind of texts without their labels (a corpus for
    general distillation before that task's, kdbench.two_stage).
    """

    class Params(ObjectiveParams):  # objective: causal_lm or masked_lm head, and a masked LM's masking
        train_size: int = Field(4000, gt=0)
        eval_size: int = Field(500, gt=0)
        forms: list[Literal[FORMS]] = Field(default_factory=lambda: ["single", "but"], min_length=1)
        seed: int = 1234
        verdict: bool = True  # false: the reviews alone

    def load(self) -> TaskData:
        p = self.params
        rng = random.Random(p.seed)

        def split(n: int) -> list[dict]:
            rows = []
            for _ in range(n):
                text, label = generate_sentiment_example(rng, tuple(p.forms))
                rows.append({"text": f"{text} => {('negative', 'positive')[label]}" if p.verdict else text})
            return rows

        return p.task_data(split(p.train_size), split(p.eval_size))

