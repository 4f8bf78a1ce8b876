"""What the text-writing heads (seq2seq, causal LM) share: generate() settings, the end token, and the scores of
generated text against references (exact match, ROUGE-L)."""

from __future__ import annotations

import re
from typing import Literal

Seq2SeqMetric = Literal["perplexity", "exact_match", "rouge_l"]
METRIC_NAMES = {"perplexity": "perplexity", "exact_match": "exact match", "rouge_l": "ROUGE-L"}


def decoding(num_beams: int, sample_temperature: float | None) -> dict:
    """generate() settings: greedy or beam search, or (with a temperature) plain sampling from the model's
    distribution at that temperature, with no top-k or top-p cut (a model's generation config may set some)."""
    if sample_temperature is None:
        return {"num_beams": num_beams, "do_sample": False}
    return {"num_beams": 1, "do_sample": True, "temperature": sample_temperature, "top_k": 0, "top_p": 1.0}


def end_token_id(tokenizer) -> int | None:
    """The token that ends a target: end-of-sequence, or the separator of a tokenizer that has none."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


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
