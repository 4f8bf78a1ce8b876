"""Heads: what a task asks of a model's output, and everything that follows from it.

A task names its head (`TaskData.head`). The head decides:
- the transformers Auto class that builds the model (a sequence classifier, a causal LM);
- how a split's rows become model inputs and labels, and how a batch is padded;
- which logit positions predict which labels (`align`): a classifier's one row per example, a causal LM's
  position i predicting token i + 1. The distillation losses (kdbench.kernels.kd_loss) and the hard loss both
  take the aligned (..., V) logits and (...) labels, where -100 marks positions that count for nothing;
- the task metric, and whether higher is better (accuracy) or lower (perplexity).

    base                 Head, the registry, IGNORE and TEACHER_LABEL
    generation           decoding settings and generation scores, shared by the text-writing heads
    classification       one label per example: accuracy
    language_modeling    causal and masked LM: perplexity
    question_answering   multiple choice (accuracy) and extractive QA (SQuAD F1)
    seq2seq              source -> target (T5): target perplexity
"""

from __future__ import annotations

from kdbench.heads.base import IGNORE, TEACHER_LABEL, Head, get, heads

# The heads register themselves on import.
from kdbench.heads import classification, language_modeling, question_answering, seq2seq  # noqa: F401, I001

__all__ = ["IGNORE", "TEACHER_LABEL", "Head", "get", "heads"]
