"""Heads: what a task asks of a model's output, and everything that follows from it.

A task names its head (`TaskData.head`). The head decides:
- the transformers Auto class that builds the model (a sequence classifier, a causal LM);
- how a split's rows become model inputs and labels, and how a batch is padded;
- which logit positions predict which labels (`align`): a classifier's one row per example, a causal LM's
  position i predicting token i + 1. The distillation losses (kdbench.kernels.kd_loss) and the hard loss both
  take the aligned (..., V) logits and (...) labels, where -100 marks positions that count for nothing;
- the task metric, and whether higher is better (accuracy) or lower (perplexity).

Retention against the teacher is metric / teacher's metric when higher is better, teacher's / metric when lower
is better, so that 1.0 is "as good as the teacher" and less is worse either way.
"""

from __future__ import annotations

import math

from kdbench.registry import Registry

heads: Registry = Registry("head")

IGNORE = -100  # label of a position that counts for nothing (padding, the last token of a causal LM)


class Head:
    kind: str  # the registry key
    auto_class: str  # transformers Auto class that builds and loads the model
    metric_name: str
    higher_is_better = True
    # Logits of a frozen teacher can be computed once per input and reused (kdbench.trainer.cache_teacher_logits)
    # when they are small: (C,) per example for a classifier, not (L, V) per block for a language model.
    caches_teacher_logits = False

    def encode(self, rows: list[dict], tokenizer, max_len: int) -> list[dict]:  # pragma: no cover - interface
        raise NotImplementedError

    def collator(self, tokenizer):  # pragma: no cover - interface
        raise NotImplementedError

    def align(self, logits, labels):
        """(logits (..., V), labels (...)) at the positions where a logit row predicts a label."""
        return logits, labels

    def fill_teacher_labels(self, labels, teacher_logits):
        """Labels with unlabelled rows given the teacher's prediction (only classifiers have such rows)."""
        return labels

    def hard_loss(self, logits, labels):
        """Mean cross-entropy over aligned positions whose label is not IGNORE (the student-alone loss)."""
        import torch.nn.functional as F

        s, y = self.align(logits, labels)
        return F.cross_entropy(s.reshape(-1, s.shape[-1]).float(), y.reshape(-1), ignore_index=IGNORE)

    def evaluate(self, model, rows: list[dict], collator, device: str, batch_size: int = 64) -> float:
        """The task metric of `model` on tokenized `rows`."""
        import torch

        from kdbench.models import model_inputs

        model.eval()
        state = self.new_state()
        with torch.inference_mode():
            for i in range(0, len(rows), batch_size):
                batch = collator([dict(r) for r in rows[i : i + batch_size]])
                labels = batch.pop("labels")
                inputs = model_inputs({k: v.to(device) for k, v in batch.items()}, model)
                self.update(state, model(**inputs).logits.float().cpu(), labels)
        return self.finish(state)

    def retention(self, metric: float, teacher_metric: float | None) -> float | None:
        if not teacher_metric or metric is None:
            return None
        if self.higher_is_better:
            return metric / teacher_metric
        return teacher_metric / metric if metric else None


@heads.register("classification")
class Classification(Head):
    """One label per example (or sentence pair): AutoModelForSequenceClassification, scored by accuracy."""

    kind = "classification"
    auto_class = "AutoModelForSequenceClassification"
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

        from kdbench.tasks import TEACHER_LABEL

        return torch.where(labels == TEACHER_LABEL, teacher_logits.argmax(-1), labels)

    def new_state(self):
        return {"preds": [], "labels": []}

    def update(self, state, logits, labels):
        state["preds"].append(logits.argmax(-1))
        state["labels"].append(labels)

    def finish(self, state) -> float:
        import torch

        from kdbench.tasks import accuracy

        return accuracy(torch.cat(state["preds"]), torch.cat(state["labels"]))


@heads.register("causal_lm")
class CausalLM(Head):
    """Next-token prediction: AutoModelForCausalLM, scored by perplexity (lower is better).

    A split's texts are tokenized, each ended by the tokenizer's end-of-sequence token, concatenated and cut into
    blocks of `max_len` tokens (the usual "group texts" packing, so no position is padding and every block is full;
    a split shorter than one block gives one shorter block). Position i predicts token i + 1; the loss and the
    perplexity average over every predicted token of the split.
    """

    kind = "causal_lm"
    auto_class = "AutoModelForCausalLM"
    metric_name = "perplexity"
    higher_is_better = False

    def encode(self, rows, tokenizer, max_len):
        if not rows:
            return []
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        stream: list[int] = []
        for ids in tokenizer([r["text"] for r in rows])["input_ids"]:
            stream += ids if (eos is None or (ids and ids[-1] == eos)) else ids + [eos]
        if len(stream) < 2:
            return []
        blocks = [stream[i : i + max_len] for i in range(0, len(stream), max_len)]
        if len(blocks) > 1 and len(blocks[-1]) < max_len:
            blocks.pop()  # a ragged tail would be the only padded block
        return [{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b)} for b in blocks]

    def collator(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        # pads labels with IGNORE, inputs with the pad token; packed blocks only need it for profiling batches
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)

    def align(self, logits, labels):
        return logits[..., :-1, :], labels[..., 1:]

    def new_state(self):
        return {"nll": 0.0, "tokens": 0}

    def update(self, state, logits, labels):
        import torch.nn.functional as F

        s, y = self.align(logits, labels)
        state["nll"] += float(F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                                              reduction="sum"))
        state["tokens"] += int((y != IGNORE).sum())

    def finish(self, state) -> float:
        return math.exp(state["nll"] / state["tokens"]) if state["tokens"] else math.nan


def get(kind: str) -> Head:
    return heads.get(kind)()
