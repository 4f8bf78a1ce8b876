"""The Head base class, the heads registry, and the label constants that heads, tasks and trainers share.

Retention against the teacher is metric / teacher's metric when higher is better, teacher's / metric when lower
is better, so that 1.0 is "as good as the teacher" and less is worse either way.
"""

from __future__ import annotations

from kdbench.registry import Registry

heads: Registry = Registry("head")

IGNORE = -100  # label of a position that counts for nothing (padding, the last token of a causal LM)
# A training row whose label is TEACHER_LABEL has no gold label: the Distiller substitutes the teacher's
# prediction (the classic "transfer set"); a student trained alone never sees such rows.
TEACHER_LABEL = -1


class Head:
    kind: str  # the registry key
    auto_class: str  # transformers Auto class that builds and loads the model
    metric_name: str
    higher_is_better = True
    # Logits of a frozen teacher can be computed once per input and reused
    # (kdbench.train.teacher_cache.cache_teacher_logits) when they are small: (C,) per example for a classifier,
    # not (L, V) per block for a language model.
    caches_teacher_logits = False
    # A method's `teacher_top_k` can cache a language model's teacher as its top-k tokens per position: its inputs
    # must be the same every epoch (not a masked LM's, whose masks are drawn per batch).
    caches_teacher_top_k = False
    generates = False  # a model of this head writes text with generate() (its decoding latency can be profiled)
    # `update` takes the logits where the model left them (a language model's (B, L, V) logits are gigabytes:
    # copying them to the host in fp32 would cost more than the forward pass); otherwise fp32 on the CPU.
    metric_on_device = False
    # Its logit rows are a vocabulary, made from hidden states by the model's output layer: a method's
    # `fused_linear` can run that layer inside the loss (kdbench.output_layer).
    vocab_rows = False

    def encode(self, rows: list[dict], tokenizer, max_len: int) -> list[dict]:  # pragma: no cover - interface
        raise NotImplementedError

    def collator(self, tokenizer):  # pragma: no cover - interface
        raise NotImplementedError

    def texts(self, rows: list[dict]) -> list[str]:
        """The texts of `rows` that a pair's own tokenizer is trained on (kdbench.models.pair_tokenizer)."""
        return [r["text"] for r in rows]

    def logits(self, out):
        """The tensor of model outputs `out` that the losses and the metric read (most models' `.logits`; an
        extractive QA model's start and end logits, stacked)."""
        return out.logits

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
        return self.finish(self.forward_pass(model, rows, collator, device, batch_size))

    def forward_pass(self, model, rows: list[dict], collator, device: str, batch_size: int = 64):
        """The metric state (`new_state`, `update`) after one inference pass of `model` over `rows`."""
        import torch

        from kdbench.models import model_inputs

        rows, collator = self.eval_inputs(rows, collator)
        model.eval()
        state = self.new_state()
        with torch.inference_mode():
            for i in range(0, len(rows), batch_size):
                batch = collator([dict(r) for r in rows[i : i + batch_size]])
                labels = batch.pop("labels")
                inputs = model_inputs({k: v.to(device) for k, v in batch.items()}, model)
                logits = self.logits(model(**inputs))
                if self.metric_on_device:
                    self.update(state, logits, labels.to(logits.device))
                else:
                    self.update(state, logits.float().cpu(), labels)
        return state

    def eval_inputs(self, rows: list[dict], collator):
        """(rows, collator) as the metric reads them (default: as given; a masked LM fixes its masks here)."""
        return rows, collator

    def measure(self, model, rows: list[dict], collator, device: str) -> tuple[float, dict[str, float]]:
        """(the task metric, the metrics recorded next to it) of `model` on `rows`: what a profiled variant
        records. Default: the task metric alone."""
        return self.evaluate(model, rows, collator, device), {}

    def pair_options(self, teacher_ref, student_ref, tokenizer, pair: str) -> dict:
        """Keyword settings of `encode` and `collator` that depend on the pair's models, not only on its tokenizer
        (a seq2seq model's decoder start token); asked before anything trains, so it also refuses, in one line
        naming `pair`, models this head cannot serve. Default: none."""
        return {}

    def retention(self, metric: float, teacher_metric: float | None) -> float | None:
        if not teacher_metric or metric is None:
            return None
        if self.higher_is_better:
            return metric / teacher_metric
        return teacher_metric / metric if metric else None


def get(kind: str, **params) -> Head:
    """A head instance; `params` are the task's settings for it (a seq2seq task's metric)."""
    return heads.get(kind)(**params)
