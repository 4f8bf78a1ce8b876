"""The sequence-to-sequence head: a source text in, a target text out (T5), scored by target perplexity or by
what greedy/beam decoding produces (exact match, ROUGE-L)."""

from __future__ import annotations

import re
from typing import Literal

from kdbench.heads import IGNORE, heads
from kdbench.heads.language_modeling import Perplexity

Seq2SeqMetric = Literal["perplexity", "exact_match", "rouge_l"]
METRIC_NAMES = {"perplexity": "perplexity", "exact_match": "exact match", "rouge_l": "ROUGE-L"}


@heads.register("seq2seq")
class Seq2Seq(Perplexity):
    """Source -> target: AutoModelForSeq2SeqLM, scored by the token-level perplexity of the target given the
    source (teacher forcing; lower is better).

    Rows have `source` and `target` texts. The source, truncated to `max_len` tokens, is the encoder's
    input_ids/attention_mask; the target's tokens, ended by the end-of-sequence token (the separator if the
    tokenizer has none) and truncated to `max_len`, are the labels (padded with IGNORE). The decoder's inputs are
    the labels shifted right behind the decoder start token, which is the pad token (T5's convention:
    kdbench.models gives inline encoder-decoder configs that `decoder_start_token_id`); they are in the rows as
    `decoder_input_ids`, so training, evaluation and profiling batches all carry them, and logit position i
    predicts label i (no shift at the loss).

    `metric` (a task parameter):
    - perplexity: exp of the mean NLL over every target token of the split, end-of-sequence included (lower is
      better); one teacher-forced forward pass per batch.
    - exact_match: the share of eval rows whose decoded output equals the reference, compared lowercased with
      runs of whitespace collapsed (higher is better).
    - rouge_l: mean ROUGE-L F1 (torchmetrics' ROUGEScore: lowercased, non-alphanumerics dropped, longest common
      subsequence of words; higher is better).
    The generation metrics decode with `num_beams` (1: greedy) up to `max_new_tokens` new tokens (default: the
    longest reference of the split), and compare against the reference as the model was trained on it: the
    target's tokens decoded back to text (so truncated at max_seq_length, and passed through the same tokenizer as
    the output). Whatever the metric, a variant also records its target perplexity and token accuracy (`measure`).
    """

    kind = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    generates = True
    GENERATE_BATCH = 64  # rows per generate() call

    def __init__(self, metric: Seq2SeqMetric = "perplexity", num_beams: int = 1, max_new_tokens: int | None = None):
        if metric not in METRIC_NAMES:
            raise ValueError(f"seq2seq metric {metric!r}: expected one of {', '.join(METRIC_NAMES)}")
        self.metric, self.num_beams, self.max_new_tokens = metric, num_beams, max_new_tokens
        self.metric_name = METRIC_NAMES[metric]
        self.higher_is_better = metric != "perplexity"

    def check_model(self, ref, tokenizer, who):
        """Decoder inputs are built in the rows behind the pad token, T5's decoder start. A pretrained model that
        starts its decoder with another token (BART's is the end-of-sequence token) would be trained and scored on
        inputs it never saw: refused."""
        from kdbench import models
        from kdbench.errors import KdbenchError

        if not models.is_pretrained(ref):
            return  # inline configs get the pad token as their decoder start (kdbench.models.build_model)
        start = getattr(models.load_config(ref), "decoder_start_token_id", None)
        if start is not None and start != decoder_start_token_id(tokenizer):
            raise KdbenchError(f"{who}: {ref!r} starts its decoder with token {start}, not the pad token "
                               f"{decoder_start_token_id(tokenizer)}; kdbench's seq2seq head supports T5-style "
                               "models only")

    def evaluate(self, model, rows, collator, device, batch_size=64):
        if self.metric == "perplexity":
            return super().evaluate(model, rows, collator, device, batch_size)
        tokenizer = collator.tokenizer
        outputs = self.generate(model, rows, tokenizer, device, num_beams=self.num_beams,
                                max_new_tokens=self.max_new_tokens, batch_size=batch_size)
        hypotheses = tokenizer.batch_decode(outputs, skip_special_tokens=True)
        references = tokenizer.batch_decode([reference_ids(r["labels"], tokenizer) for r in rows],
                                            skip_special_tokens=True)
        return score_generations(self.metric, hypotheses, references)

    def measure(self, model, rows, collator, device):
        """Next to a generation metric, the teacher-forced view of the same model: target perplexity and token
        accuracy, from one pass."""
        perplexity, extra = super().measure(model, rows, collator, device)
        if self.metric == "perplexity":
            return perplexity, extra
        return self.evaluate(model, rows, collator, device), {"perplexity": perplexity, **extra}

    def teacher_targets(self, teacher, rows, tokenizer, device, *, max_len: int, num_beams: int = 1,
                        max_new_tokens: int | None = None) -> list[dict]:
        """`rows` relabelled with what `teacher` decodes from their sources (sequence-level KD)."""
        outputs = self.generate(teacher, rows, tokenizer, device, num_beams=num_beams,
                                max_new_tokens=max_new_tokens or max_len)
        return [target_row(r, out, tokenizer, max_len) for r, out in zip(rows, outputs)]

    def generate(self, model, rows, tokenizer, device, *, num_beams: int = 1, max_new_tokens: int | None = None,
                 batch_size: int = GENERATE_BATCH) -> list[list[int]]:
        """Each row's decoded target tokens (greedy, or beam search), the start token dropped and cut before the
        first end-of-sequence token. `max_new_tokens` defaults to the longest label of `rows`."""
        import torch

        if max_new_tokens is None:
            max_new_tokens = max((len(r["labels"]) for r in rows if "labels" in r), default=32)
        eos = end_token_id(tokenizer)
        start = decoder_start_token_id(tokenizer)
        model.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(rows), batch_size):
                batch = tokenizer.pad([{k: r[k] for k in ("input_ids", "attention_mask")}
                                       for r in rows[i : i + batch_size]], return_tensors="pt")
                ids = model.generate(input_ids=batch["input_ids"].to(device),
                                     attention_mask=batch["attention_mask"].to(device),
                                     max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                     decoder_start_token_id=start, eos_token_id=eos, pad_token_id=start)
                for seq in ids[:, 1:].tolist():  # position 0 is the decoder start token
                    out.append(seq[: seq.index(eos)] if eos in seq else seq)
        return out

    def encode(self, rows, tokenizer, max_len):
        if not rows:
            return []
        src = tokenizer([r["source"] for r in rows], truncation=True, max_length=max_len)
        targets = tokenizer([r["target"] for r in rows], add_special_tokens=False)["input_ids"]
        return [target_row({"input_ids": src["input_ids"][i], "attention_mask": src["attention_mask"][i]}, ids,
                           tokenizer, max_len) for i, ids in enumerate(targets)]

    def collator(self, tokenizer):
        return Seq2SeqCollator(tokenizer)

    def texts(self, rows):
        return [t for r in rows for t in (r["source"], r["target"])]


def decoder_start_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def end_token_id(tokenizer) -> int | None:
    """The token that ends a target: end-of-sequence, or the separator of a tokenizer that has none."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def reference_ids(labels, tokenizer) -> list[int]:
    """A row's labels as the reference tokens: padding and the end token removed."""
    eos = end_token_id(tokenizer)
    return [t for t in labels if t != IGNORE and t != eos]


def target_row(row: dict, target: list[int], tokenizer, max_len: int) -> dict:
    """`row` with `target` token ids (no end token) as its labels and decoder inputs, encoded as `encode` does."""
    eos = end_token_id(tokenizer)
    labels = (list(target) + ([eos] if eos is not None else []))[:max_len]
    return {**row, "decoder_input_ids": [decoder_start_token_id(tokenizer)] + labels[:-1], "labels": labels}


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def score_generations(metric: str, hypotheses: list[str], references: list[str]) -> float:
    """Mean exact match or ROUGE-L F1 of `hypotheses` against `references` (same length)."""
    if not references:
        return float("nan")
    if metric == "exact_match":
        return sum(_normalise(h) == _normalise(r) for h, r in zip(hypotheses, references)) / len(references)
    from torchmetrics.text import ROUGEScore

    rouge = ROUGEScore(rouge_keys=("rougeL",))
    return float(rouge(hypotheses, references)["rougeL_fmeasure"])


class Seq2SeqCollator:
    """Pads source inputs with the pad token, `decoder_input_ids` with the pad token and labels with IGNORE,
    each to its own longest row: (B, Ls) and (B, Lt)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, rows):
        import torch

        pad = decoder_start_token_id(self.tokenizer)
        batch = dict(self.tokenizer.pad([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows],
                                        return_tensors="pt"))
        for key, fill in (("decoder_input_ids", pad), ("labels", IGNORE)):
            if all(key in r for r in rows):
                n = max(len(r[key]) for r in rows)
                batch[key] = torch.tensor([list(r[key]) + [fill] * (n - len(r[key])) for r in rows])
        return batch
