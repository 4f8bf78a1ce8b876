"""Question-answering heads: multiple choice (accuracy) and extractive span QA (SQuAD F1).

Multiple choice (SWAG, CommonsenseQA): every (question, choice) pair is one sequence, so a batch is (B, C, L) and the
model gives one score per choice, (B, C) logits: distillation is over the C choices, as for a classifier.

Extractive QA (SQuAD): the model gives a start and an end score per token, (B, L) each. The losses read them stacked
as (2B, L) rows, start rows first, against (2B,) labels (the start then the end positions): the hard loss is the mean
of the start and end cross-entropies, as transformers' own QA loss, and logit KD is kd_loss over the start and the end
distributions, as in DistilBERT's SQuAD distillation (Sanh et al., 2019).
"""

from __future__ import annotations

import collections
import re
import string

from kdbench.errors import KdbenchError
from kdbench.heads.base import TEACHER_LABEL, Head, heads
from kdbench.heads.classification import Classification

MAX_ANSWER_TOKENS = 30  # the longest span decoding considers, as HF's run_qa and the SQuAD baselines
_PUNCTUATION = set(string.punctuation)


def _pad(seqs: list[list[int]], value: int, length: int) -> list[list[int]]:
    """Right-padded to `length`: positions are labels here, so left padding (some tokenizers' default) must not
    shift them."""
    return [list(s) + [value] * (length - len(s)) for s in seqs]


def _teacher_logits(rows: list[dict]):
    import torch

    if "teacher_logits" not in rows[0]:
        return {}
    return {"teacher_logits": torch.tensor([r["teacher_logits"] for r in rows], dtype=torch.float32)}


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice


class MultipleChoiceCollator:
    """Rows of (C, L_i) token lists -> (B, C, L) tensors padded to the batch's longest sequence, labels (B,)."""

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        length = max(len(ids) for r in rows for ids in r["input_ids"])
        batch = {}
        for key, value in (("input_ids", self.pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in rows[0]:
                batch[key] = torch.tensor([_pad(r[key], value, length) for r in rows], dtype=torch.long)
        if "labels" in rows[0]:
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        return {**batch, **_teacher_logits(rows)}


@heads.register("multiple_choice")
class MultipleChoice(Classification):
    """One right choice out of C: AutoModelForMultipleChoice, scored by accuracy.

    Rows: `question`, `choices` (C strings, the same C for every row of a task) and `label` (the right choice's index,
    or TEACHER_LABEL for a transfer-set row). Each choice is encoded as the pair (question, choice), the longer of the
    two truncated first.

    Encoded rows a Distiller trains on: `input_ids` and `attention_mask` (C, L) per row (MultipleChoiceCollator
    pads them to (B, C, L)) and `labels`, the right choice's index.
    """

    kind = "multiple_choice"
    auto_class = "AutoModelForMultipleChoice"
    metric_name = "accuracy"
    caches_teacher_logits = True  # (C,) per example

    def encode(self, rows, tokenizer, max_len):
        out = []
        for r in rows:
            choices = list(r["choices"])
            enc = tokenizer([r["question"]] * len(choices), choices, truncation=True, max_length=max_len)
            keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
            out.append({**{k: enc[k] for k in keys}, "labels": r["label"]})
        return out

    def collator(self, tokenizer):
        return MultipleChoiceCollator(tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Extractive QA: answer-span encoding, span decoding, SQuAD's answer normalisation and F1


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's official normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """SQuAD v1.1's token F1 between normalised answers (0 when either is empty and the other is not)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(metric, prediction: str, golds: list[str]) -> float:
    """The official script's max over the gold answers (SQuAD's dev set has up to six per question)."""
    return max((metric(prediction, g) for g in golds), default=0.0)


def answer_token_span(offsets: list, start_char: int, end_char: int) -> tuple[int, int]:
    """(start, end) token indices of the answer characters [start_char, end_char) given each token's character span
    in the context (None for question and special tokens); (0, 0), the CLS position, when truncation cut the answer
    away, as HF's run_qa labels it."""
    context = [i for i, o in enumerate(offsets) if o is not None]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return 0, 0
    start = max(i for i in context if offsets[i][0] <= start_char)
    end = min(i for i in context if offsets[i][1] >= end_char)
    return start, max(start, end)


def best_spans(start_logits, end_logits, valid, max_tokens: int = MAX_ANSWER_TOKENS):
    """(B, 2) token indices (start, end) maximising start + end score over spans with start <= end, at most
    `max_tokens` tokens, both inside `valid` (B, L) (the context's tokens). A row without valid tokens gets (0, 0)."""
    import torch

    L = start_logits.shape[-1]
    scores = start_logits[:, :, None].float() + end_logits[:, None, :].float()  # (B, L, L): [b, start, end]
    i = torch.arange(L)
    ok = (i[None, :] >= i[:, None]) & (i[None, :] - i[:, None] < max_tokens)  # (L, L)
    ok = ok[None] & valid[:, :, None] & valid[:, None, :]
    best = scores.masked_fill(~ok, float("-inf")).reshape(len(scores), -1).argmax(-1)
    spans = torch.stack([best // L, best % L], dim=-1)
    return torch.where(valid.any(-1, keepdim=True), spans, torch.zeros_like(spans))


def _clip_question(question: str, tokenizer, max_tokens: int) -> str:
    """The question cut to `max_tokens` tokens, so that the context always keeps half the sequence."""
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return question
    return question[: enc["offset_mapping"][max_tokens - 1][1]]


class SpanCollator:
    """Rows -> (B, L) token tensors padded to the batch's longest row, labels (B, 2) = (start, end) positions."""

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        length = max(len(r["input_ids"]) for r in rows)
        batch = {}
        for key, value in (("input_ids", self.pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in rows[0]:
                batch[key] = torch.tensor(_pad([r[key] for r in rows], value, length), dtype=torch.long)
        if "labels" in rows[0]:
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        return batch


@heads.register("extractive_qa")
class ExtractiveQA(Head):
    """The answer is a span of the context: AutoModelForQuestionAnswering, scored by SQuAD F1 (0..1).

    Rows: `question`, `context` and `answers` {text: [...], answer_start: [...]} (SQuAD's format; the first answer is
    the training label, every answer counts for the metric). A row without answers (a transfer-set row) is labelled
    by the teacher: its start and end argmax.

    Each row is one sequence [CLS] question [SEP] context [SEP] of at most `max_len` tokens: a longer context is cut
    at its end (no doc-stride windows), and an answer cut away is labelled (0, 0), the CLS token, as HF's run_qa
    does; its gold answers still count in the metric, so truncation costs teacher and student alike. A question
    longer than half of `max_len` is cut to that half. Needs a fast tokenizer (character offsets).

    Decoding: the span with the best start + end score, start <= end, at most MAX_ANSWER_TOKENS tokens, inside the
    context; its text is the context's characters under those tokens.

    Encoded rows a Distiller trains on: `input_ids` and `attention_mask` (L,) and `labels` = [start, end] token
    positions ([TEACHER_LABEL, TEACHER_LABEL] for a transfer-set row), batched by SpanCollator.
    """

    kind = "extractive_qa"
    auto_class = "AutoModelForQuestionAnswering"
    metric_name = "f1"
    caches_teacher_logits = False  # (2, L) per example, padded per batch: not worth the bookkeeping

    def encode(self, rows, tokenizer, max_len):
        if not rows:
            return []
        if not getattr(tokenizer, "is_fast", False):
            raise KdbenchError(f"extractive QA needs a fast tokenizer (character offsets); "
                               f"{type(tokenizer).__name__} is not one")
        questions = [_clip_question(r["question"], tokenizer, max_len // 2) for r in rows]
        enc = tokenizer(questions, [r["context"] for r in rows], truncation="only_second", max_length=max_len,
                        return_offsets_mapping=True)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        out = []
        for i, r in enumerate(rows):
            seq_ids = enc.sequence_ids(i)
            offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], seq_ids)]
            answers = r["answers"]
            if answers["text"]:
                start_char = int(answers["answer_start"][0])
                labels = list(answer_token_span(offsets, start_char, start_char + len(answers["text"][0])))
            else:
                labels = [TEACHER_LABEL, TEACHER_LABEL]
            out.append({**{k: enc[k][i] for k in keys}, "labels": labels, "offsets": offsets,
                        "context": r["context"], "golds": list(answers["text"])})
        return out

    def collator(self, tokenizer):
        return SpanCollator(tokenizer)

    def logits(self, out):
        """(2B, L): the start logits of the batch, then its end logits."""
        import torch

        if getattr(out, "start_logits", None) is None:
            return out.logits  # already stacked (a precomputed teacher)
        return torch.cat([out.start_logits, out.end_logits], dim=0)

    def align(self, logits, labels):
        """(2B, L) logits against labels (B, 2) -> (2B,): the start positions, then the end positions."""
        return logits, labels.transpose(0, 1).reshape(-1)

    def fill_teacher_labels(self, labels, teacher_logits):
        import torch

        predicted = teacher_logits.argmax(-1).reshape(2, -1).transpose(0, 1)  # (B, 2)
        return torch.where(labels == TEACHER_LABEL, predicted, labels)

    def predict(self, start_logits, end_logits, rows: list[dict]) -> list[str]:
        """The decoded answer text of every row, from its (L,) start and end logits."""
        import torch

        valid = torch.zeros(start_logits.shape, dtype=torch.bool)
        for j, r in enumerate(rows):
            valid[j, : len(r["offsets"])] = torch.tensor([o is not None for o in r["offsets"]])
        spans = best_spans(start_logits, end_logits, valid).tolist()
        texts = []
        for (s, e), r, ok in zip(spans, rows, valid.any(-1).tolist()):
            texts.append(r["context"][r["offsets"][s][0] : r["offsets"][e][1]] if ok else "")
        return texts

    def evaluate(self, model, rows, collator, device, batch_size: int = 64) -> float:
        """Mean SQuAD F1 (best over each question's gold answers) of `model`'s decoded answers on `rows`."""
        import torch

        from kdbench.models import model_inputs

        model.eval()
        scores = []
        with torch.inference_mode():
            for i in range(0, len(rows), batch_size):
                chunk = rows[i : i + batch_size]
                batch = collator(chunk)
                batch.pop("labels", None)
                out = model(**model_inputs({k: v.to(device) for k, v in batch.items()}, model))
                texts = self.predict(out.start_logits.float().cpu(), out.end_logits.float().cpu(), chunk)
                scores += [best_over_golds(f1_score, t, r["golds"]) for t, r in zip(texts, chunk)]
        return sum(scores) / len(scores) if scores else float("nan")
