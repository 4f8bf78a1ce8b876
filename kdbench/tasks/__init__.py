"""Tasks: where the examples come from, how they are labelled, and which head scores them.

A task is a small class with a pydantic `Params` and a `load()` returning `TaskData`: a `train` split, an optional
unlabelled `transfer` split (inputs the teacher labels for the student), an `eval` split, the label names of a
classifier, and the name of its head (kdbench.heads: how models are built, trained and scored for it).

    base                 the registry, TaskData, local files, hub loading, presets
    generated            the embedded offline tasks (the quickstart's)
    classification       text classification from local files or the hub (SST-2, IMDB, AG News, MNLI, SNLI)
    language_modeling    texts for language models (local files, WikiText-2)
    seq2seq              source -> target texts (generated, local files, XSum, CNN/DailyMail)
    question_answering   extractive (SQuAD) and multiple-choice (CommonsenseQA) QA: generated, local files, hub
"""

from __future__ import annotations

from kdbench.tasks.base import TaskData, load_task, tasks

# The families register their tasks on import.
from kdbench.tasks import classification, generated, language_modeling, question_answering, seq2seq  # noqa: F401, I001

__all__ = ["TaskData", "load_task", "tasks"]
