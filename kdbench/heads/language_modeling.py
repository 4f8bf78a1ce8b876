"""Language-modelling heads: next-token prediction (causal), scored by perplexity."""

from __future__ import annotations

import math

from kdbench.heads import IGNORE, Head, heads


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
