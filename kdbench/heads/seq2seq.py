"""The sequence-to-sequence head: a source text in, a target text out (T5), scored by target perplexity."""

from __future__ import annotations

from kdbench.heads import IGNORE, heads
from kdbench.heads.language_modeling import Perplexity


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
    predicts label i (no shift at the loss). Perplexity is exp of the mean NLL over every target token of the
    split, end-of-sequence included: cheap on a CPU (one forward pass per batch), unlike generation metrics
    (exact match, ROUGE), which need greedy decoding.
    """

    kind = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"

    def encode(self, rows, tokenizer, max_len):
        if not rows:
            return []
        src = tokenizer([r["source"] for r in rows], truncation=True, max_length=max_len)
        targets = tokenizer([r["target"] for r in rows], add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        start = decoder_start_token_id(tokenizer)
        out = []
        for i, ids in enumerate(targets):
            labels = (ids + [eos] if eos is not None else ids)[:max_len]
            out.append({"input_ids": src["input_ids"][i], "attention_mask": src["attention_mask"][i],
                        "decoder_input_ids": [start] + labels[:-1], "labels": labels})
        return out

    def collator(self, tokenizer):
        return Seq2SeqCollator(tokenizer)

    def texts(self, rows):
        return [t for r in rows for t in (r["source"], r["target"])]


def decoder_start_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


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
