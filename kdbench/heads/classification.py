"""The classification head: one label per example (or sentence pair), scored by accuracy."""

from __future__ import annotations

from kdbench.heads.base import TEACHER_LABEL, Head, heads
from kdbench.models import CLASSIFIER_CLASS, CLASSIFIER_KIND


@heads.register(CLASSIFIER_KIND)
class Classification(Head):
    """One label per example (or sentence pair): AutoModelForSequenceClassification, scored by accuracy.

    Rows a Distiller trains on: `input_ids` and `attention_mask` (L,) (`token_type_ids` if the model takes them)
    and `labels`, one int class; TEACHER_LABEL (-1) marks a transfer-set row that takes the teacher's argmax.
    """

    kind = CLASSIFIER_KIND
    auto_class = CLASSIFIER_CLASS  # also what kdbench.models builds when given no head
    metric_name = "accuracy"
    caches_teacher_logits = True

    def encode(self, rows, tokenizer, max_len):
        if not rows:
            return []
        texts = [r["text"] for r in rows]
        pairs = [r["text_pair"] for r in rows] if rows and "text_pair" in rows[0] else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_len)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return [{**{k: enc[k][i] for k in keys}, "labels": r["label"]} for i, r in enumerate(rows)]

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def fill_teacher_labels(self, labels, teacher_logits):
        import torch

        return torch.where(labels == TEACHER_LABEL, teacher_logits.argmax(-1), labels)

    def new_state(self):
        return {"preds": [], "labels": []}

    def update(self, state, logits, labels):
        state["preds"].append(logits.argmax(-1))
        state["labels"].append(labels)

    def finish(self, state) -> float:
        import torch

        return accuracy(torch.cat(state["preds"]), torch.cat(state["labels"]))


def accuracy(predictions, labels) -> float:
    """Micro accuracy with torchmetrics over (N,) int predictions and labels."""
    import torch
    from torchmetrics.functional.classification import multiclass_accuracy

    preds = torch.as_tensor(predictions)
    target = torch.as_tensor(labels)
    num_classes = int(max(preds.max(), target.max())) + 1
    return float(multiclass_accuracy(preds, target, num_classes=num_classes, average="micro"))
