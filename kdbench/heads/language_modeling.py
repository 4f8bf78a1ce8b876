"""Language-modelling heads: next-token prediction (causal) and masked tokens (BERT), scored by perplexity."""

from __future__ import annotations

import math

from kdbench.heads.base import IGNORE, Head, heads
from kdbench.heads.generation import METRIC_NAMES, decoding, end_token_id, score_generations


def pack(rows, tokenizer, max_len: int) -> list[list[int]]:
    """Token blocks of `max_len` from the rows' texts: each text tokenized and ended by the tokenizer's
    end-of-sequence token (its separator if it has none), concatenated and cut (the usual "group texts" packing:
    every block is full; a split shorter than one block gives one shorter block; a ragged tail is dropped)."""
    if not rows:
        return []
    eos = end_token_id(tokenizer)
    stream: list[int] = []
    for ids in tokenizer([r["text"] for r in rows])["input_ids"]:
        stream += ids if (eos is None or (ids and ids[-1] == eos)) else ids + [eos]
    if len(stream) < 2:
        return []
    blocks = [stream[i : i + max_len] for i in range(0, len(stream), max_len)]
    if len(blocks) > 1 and len(blocks[-1]) < max_len:
        blocks.pop()  # a ragged tail would be the only padded block
    return blocks


class Perplexity(Head):
    """exp of the mean negative log-likelihood over every aligned position whose label is not IGNORE; recorded
    next to it, from the same pass, the token accuracy: the share of those positions whose top logit is the
    label (next-token accuracy for a causal LM, masked-token accuracy for a masked one)."""

    metric_name = "perplexity"
    higher_is_better = False
    metric_on_device = True
    vocab_rows = True
    CHUNK_ELEMENTS = 1 << 26  # logits per fp32 chunk of `update` (256 MB), whatever the batch and vocabulary

    def new_state(self):
        return {"nll": 0.0, "tokens": 0, "correct": 0}

    def update(self, state, logits, labels):
        """Sums over the aligned positions, in fp32, a chunk of rows at a time (on the logits' device)."""
        import torch.nn.functional as F

        s, y = self.align(logits, labels)
        s, y = s.reshape(-1, s.shape[-1]), y.reshape(-1)
        step = max(1, self.CHUNK_ELEMENTS // s.shape[-1])
        for i in range(0, s.shape[0], step):
            rows, targets = s[i : i + step].float(), y[i : i + step]
            counted = targets != IGNORE
            state["nll"] += float(F.cross_entropy(rows, targets, ignore_index=IGNORE, reduction="sum"))
            state["tokens"] += int(counted.sum())
            state["correct"] += int(((rows.argmax(-1) == targets) & counted).sum())

    def finish(self, state) -> float:
        return math.exp(state["nll"] / state["tokens"]) if state["tokens"] else math.nan

    def measure(self, model, rows, collator, device):
        state = self.forward_pass(model, rows, collator, device)
        accuracy = state["correct"] / state["tokens"] if state["tokens"] else math.nan
        return self.finish(state), {"token accuracy": accuracy}


@heads.register("causal_lm")
class CausalLM(Perplexity):
    """Next-token prediction: AutoModelForCausalLM, scored by perplexity (lower is better).

    A split's texts are tokenized, each ended by the tokenizer's end-of-sequence token, concatenated and cut into
    blocks of `max_len` tokens (the usual "group texts" packing, so no position is padding and every block is full;
    a split shorter than one block gives one shorter block). Position i predicts token i + 1; the loss and the
    perplexity average over every predicted token of the split.

    Rows a Distiller trains on: `input_ids` and `attention_mask` (L,), and `labels` (L,): the tokens themselves
    (the head shifts them), IGNORE (-100) where no loss is wanted. Without `labels` there is nothing to align.
    """

    kind = "causal_lm"
    auto_class = "AutoModelForCausalLM"
    generates = True
    caches_teacher_top_k = True

    def __init__(self, continuation_metric: str | None = None):
        if continuation_metric not in (None, "rouge_l", "exact_match"):
            raise ValueError(f"continuation_metric {continuation_metric!r}: expected rouge_l or exact_match")
        self.continuation_metric = continuation_metric
        self.continuation_name = continuation_metric and f"continuation {METRIC_NAMES[continuation_metric]}"

    def measure(self, model, rows, collator, device):
        """Perplexity and token accuracy; with a `continuation_metric`, also how well the model's greedy
        continuation of each block's first half matches the block's second half (`continuation_score`)."""
        perplexity, extra = super().measure(model, rows, collator, device)
        if self.continuation_metric:
            extra[self.continuation_name] = self.continuation_score(model, rows, collator.tokenizer, device)
        return perplexity, extra

    def continuation_score(self, model, rows, tokenizer, device) -> float:
        """Exact match or ROUGE-L F1 of the greedy continuation of each block's first half (len // 2 tokens)
        against its gold second half, both cut after their first end-of-sequence token: the model finishes the
        document it was given, as far as the block holds it. The texts compared are the tokens decoded without
        special tokens."""
        eos = end_token_id(tokenizer)
        blocks = [list(r["input_ids"]) for r in rows if len(r["input_ids"]) >= 2]
        prompts = [b[: len(b) // 2] for b in blocks]
        golds = [b[len(p):] for b, p in zip(blocks, prompts)]
        hypotheses: list[list[int]] = [[] for _ in blocks]
        for rest in sorted({len(g) for g in golds}):  # each prompt continued as far as its block goes
            members = [i for i, g in enumerate(golds) if len(g) == rest]
            continued = self.generate(model, [prompts[i] for i in members], tokenizer, device, max_new_tokens=rest)
            for i, seq in zip(members, continued):
                hypotheses[i] = seq
        golds = [g[: g.index(eos) + 1] if eos in g else g for g in golds]
        return score_generations(self.continuation_metric,
                                 [tokenizer.decode(h, skip_special_tokens=True) for h in hypotheses],
                                 [tokenizer.decode(g, skip_special_tokens=True) for g in golds])

    def encode(self, rows, tokenizer, max_len):
        return [{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b)}
                for b in pack(rows, tokenizer, max_len)]

    def collator(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        # pads labels with IGNORE, inputs with the pad token; packed blocks only need it for profiling batches
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)

    def align(self, logits, labels):
        """Position i predicts token i + 1: the labels shifted left by one, IGNORE at the last position. The
        logits stay whole rather than sliced to [..., :-1, :]: a slice of (B, L, V) cannot be flattened into
        rows without a copy, and its gradient would be scattered back into a new (B, L, V) tensor."""
        import torch

        return logits, torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], IGNORE)], dim=-1)

    GENERATE_BATCH = 64  # blocks per generate() call

    def decoded_targets(self, model, rows, tokenizer, device, *, max_len: int, num_beams: int = 1,
                        max_new_tokens: int | None = None, prompt_length: int | None = None,
                        sample_temperature: float | None = None) -> list[dict]:
        """Rows whose targets `model` wrote (sequence-level KD: the teacher; on-policy KD: the student): each
        block's first `prompt_length` tokens (default: half of `max_len`) continued by `model`, greedy, by beam
        search, or sampled at `sample_temperature`, for up to `max_new_tokens` tokens and never past `max_len`
        in all, and cut after the first end-of-sequence token (the end of a document). The new row's labels are
        the continuation only (the prompt's are IGNORE): the student learns to continue as the model does
        (`with_prompt_loss` labels the prompt too)."""
        from kdbench.errors import KdbenchError

        prompt_length = prompt_length or max_len // 2
        if prompt_length >= max_len:
            raise KdbenchError(f"prompt_length {prompt_length} leaves no room to continue within max_seq_length "
                               f"{max_len}")
        new = min(max_new_tokens or max_len, max_len - prompt_length)
        prompts = [list(r["input_ids"][: min(prompt_length, len(r["input_ids"]) - 1)]) for r in rows]
        continuations = self.generate(model, prompts, tokenizer, device, num_beams=num_beams, max_new_tokens=new,
                                      sample_temperature=sample_temperature)
        return [{"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)), "labels": [IGNORE] * len(p) + c}
                for p, c in zip(prompts, continuations)]

    @staticmethod
    def with_prompt_loss(rows: list[dict]) -> list[dict]:
        """`decoded_targets` rows with the prompt's own (gold) tokens as labels too: every token is one."""
        return [{**r, "labels": list(r["input_ids"])} for r in rows]

    def generate(self, model, prompts: list[list[int]], tokenizer, device, *, num_beams: int = 1,
                 max_new_tokens: int, batch_size: int = GENERATE_BATCH,
                 sample_temperature: float | None = None) -> list[list[int]]:
        """Each prompt's continuation by `model` (greedy, beam search, or sampling at `sample_temperature`), cut
        after its first end-of-sequence token. Prompts go in batches of one length, so none is padded (packed
        blocks all have one length)."""
        import torch

        eos = end_token_id(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        out: list[list[int]] = [[] for _ in prompts]
        model.eval()
        with torch.inference_mode():
            for length, members in by_length.items():
                for j in range(0, len(members), batch_size):
                    chunk = members[j : j + batch_size]
                    ids = torch.tensor([prompts[i] for i in chunk], device=device)
                    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                               max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                               **decoding(num_beams, sample_temperature))
                    for i, seq in zip(chunk, generated[:, length:].tolist()):
                        out[i] = seq[: seq.index(eos) + 1] if eos in seq else seq
        return out


@heads.register("masked_lm")
class MaskedLM(Perplexity):
    """Masked-token prediction (BERT): AutoModelForMaskedLM, scored by masked-token pseudo-perplexity (lower is
    better).

    Texts are packed into blocks as for the causal head (`pack`). Encoded rows carry the clean block as `labels`;
    the collator masks: a share `probability` (BERT's 15% by default) of the non-special tokens, of which 80%
    become the mask token, 10% a random token and 10% stay, with labels IGNORE except at the chosen positions. A
    training batch gets a fresh random mask (from torch's generator, which the Trainer seeds), shared by teacher
    and student inside one step, so the distillation loss, like the hard loss, counts the masked positions only
    (as DistilBERT did). A batch without labels (a profiling batch) is only padded.

    Rows a Distiller trains on: `input_ids` (L,) and `labels` (L,), the clean tokens, batched by MaskingCollator
    (which masks them); already-masked rows need `labels` IGNORE (-100) except at the masked positions.

    The metric masks the eval split with a fixed mask instead: row i is masked by a generator seeded with
    `eval_seed + i`, so every model of every run is scored on the same masked tokens whatever the batch size.
    Perplexity is exp of the mean negative log-likelihood over those tokens (what exp(eval loss) of a masked LM
    reports; not the one-mask-per-token pseudo-perplexity of Salazar et al., which costs L forward passes).
    """

    kind = "masked_lm"
    auto_class = "AutoModelForMaskedLM"

    def __init__(self, probability: float = 0.15, eval_seed: int = 0):
        self.probability, self.eval_seed = probability, eval_seed

    def encode(self, rows, tokenizer, max_len):
        return [{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b)}
                for b in pack(rows, tokenizer, max_len)]

    def collator(self, tokenizer):
        return MaskingCollator(tokenizer, self.probability)

    def eval_inputs(self, rows, collator):
        return [collator.fixed(r, self.eval_seed + i) for i, r in enumerate(rows)], collator.pad


class MaskingCollator:
    """Pads a batch (labels with IGNORE) and, when it has labels, masks it at random (see MaskedLM)."""

    def __init__(self, tokenizer, probability: float = 0.15):
        from transformers import DataCollatorForSeq2Seq

        if tokenizer.mask_token_id is None:
            from kdbench.errors import KdbenchError

            raise KdbenchError(f"tokenizer {tokenizer.name_or_path!r} has no mask token; a masked LM needs one")
        self.tokenizer, self.probability = tokenizer, probability
        self.pad = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)
        self.special = sorted(set(tokenizer.all_special_ids))

    def __call__(self, rows):
        batch = self.pad(rows)
        if batch.get("labels") is not None:
            batch["input_ids"], batch["labels"] = self.mask(batch["input_ids"], batch["labels"])
        return batch

    def mask(self, input_ids, clean, generator=None):
        """(masked input_ids, labels) for (B, L) inputs and their clean labels (IGNORE at padding)."""
        import torch

        maskable = ~(torch.isin(clean, torch.tensor(self.special)) | (clean == IGNORE))
        chosen = torch.bernoulli(torch.full(clean.shape, self.probability), generator=generator).bool() & maskable
        # A row left without a masked token gets one, so that no batch is all ignored (a NaN mean loss).
        empty = ~chosen.any(-1) & maskable.any(-1)
        if empty.any():
            pick = torch.multinomial(maskable[empty].float(), 1, generator=generator)
            chosen[empty.nonzero()[:, 0], pick[:, 0]] = True
        labels = torch.where(chosen, clean, IGNORE)
        ids = input_ids.clone()
        to_mask = torch.bernoulli(torch.full(clean.shape, 0.8), generator=generator).bool() & chosen
        ids[to_mask] = self.tokenizer.mask_token_id
        to_random = torch.bernoulli(torch.full(clean.shape, 0.5), generator=generator).bool() & chosen & ~to_mask
        random_ids = torch.randint(len(self.tokenizer), clean.shape, generator=generator, dtype=ids.dtype)
        ids[to_random] = random_ids[to_random]
        return ids, labels

    def fixed(self, row: dict, seed: int) -> dict:
        """`row` masked by a generator seeded with `seed`: the same positions and replacements every call."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        ids, labels = self.mask(torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]]), generator)
        return {**row, "input_ids": ids[0].tolist(), "labels": labels[0].tolist()}
