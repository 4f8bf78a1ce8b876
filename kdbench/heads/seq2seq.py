"""The sequence-to-sequence head: a source text in, a target text out (T5), scored by target perplexity or by
what greedy/beam decoding produces (exact match, ROUGE-L)."""

from __future__ import annotations

from kdbench.heads.base import IGNORE, heads
from kdbench.heads.generation import METRIC_NAMES, Seq2SeqMetric, decoding, end_token_id, score_generations
from kdbench.heads.language_modeling import Perplexity


@heads.register("seq2seq")
class Seq2Seq(Perplexity):
    """Source -> target: AutoModelForSeq2SeqLM, scored by the token-level perplexity of the target given the
    source (teacher forcing; lower is better).

    Rows have `source` and `target` texts. The source, truncated to `max_len` tokens, is the encoder's
    input_ids/attention_mask; the target's tokens, ended by the end-of-sequence token (the separator if the
    tokenizer has none) and truncated to `max_len`, are the labels (padded with IGNORE). The decoder's inputs are
    the labels shifted right behind the decoder start token; they are in the rows as `decoder_input_ids`, so
    training, evaluation and profiling batches all carry them, and logit position i predicts label i (no shift at
    the loss).

    Both conventions follow the pair's models (`pair_options`), as their own fine-tuning recipes do:
    - the decoder start token is the models' `decoder_start_token_id` (T5: the pad token; BART: the
      end-of-sequence token); an inline config that names none gets the pad token (kdbench.models);
    - with a pretrained model, targets begin with the special tokens its tokenizer puts before a text (BART's
      <s>; nothing for T5), which generation drops again before scoring.

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

    Encoded rows a Distiller trains on: `input_ids` and `attention_mask` (the source), `decoder_input_ids` and
    `labels` (the target, IGNORE-padded), batched by Seq2SeqCollator.
    """

    kind = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    generates = True
    caches_teacher_top_k = True
    GENERATE_BATCH = 64  # rows per generate() call

    def __init__(self, metric: Seq2SeqMetric = "perplexity", num_beams: int = 1, max_new_tokens: int | None = None):
        if metric not in METRIC_NAMES:
            raise ValueError(f"seq2seq metric {metric!r}: expected one of {', '.join(METRIC_NAMES)}")
        self.metric, self.num_beams, self.max_new_tokens = metric, num_beams, max_new_tokens
        self.metric_name = METRIC_NAMES[metric]
        self.higher_is_better = metric != "perplexity"

    def pair_options(self, teacher_ref, student_ref, tokenizer, pair):
        """The pair's decoder start token and target prefix (see the class docstring). Teacher and student are fed
        the same decoder inputs, so their decoder start tokens must agree; refused otherwise."""
        from kdbench import models
        from kdbench.errors import KdbenchError

        starts = [models.decoder_start_token_id(ref, tokenizer) for ref in (teacher_ref, student_ref)]
        if starts[0] != starts[1]:
            raise KdbenchError(
                f"pair {pair!r}: the teacher starts its decoder with token {starts[0]}, the student with "
                f"{starts[1]}; they are given the same decoder inputs, so the two must agree")
        pretrained = models.is_pretrained(teacher_ref) or models.is_pretrained(student_ref)
        return {"decoder_start": starts[0], "target_prefix": target_prefix(tokenizer) if pretrained else []}

    def evaluate(self, model, rows, collator, device, batch_size=64):
        if self.metric == "perplexity":
            return super().evaluate(model, rows, collator, device, batch_size)
        tokenizer = collator.tokenizer
        outputs = self.generate(model, rows, tokenizer, device, num_beams=self.num_beams,
                                max_new_tokens=self.max_new_tokens, batch_size=batch_size,
                                decoder_start=collator.decoder_start, target_prefix=collator.target_prefix)
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

    def decoded_targets(self, model, rows, tokenizer, device, *, max_len: int, num_beams: int = 1,
                        max_new_tokens: int | None = None, decoder_start: int | None = None,
                        target_prefix: list[int] = (), sample_temperature: float | None = None) -> list[dict]:
        """`rows` relabelled with what `model` decodes from their sources (sequence-level KD: the teacher;
        on-policy KD: the student, sampling at `sample_temperature`)."""
        outputs = self.generate(model, rows, tokenizer, device, num_beams=num_beams,
                                max_new_tokens=max_new_tokens or max_len, decoder_start=decoder_start,
                                target_prefix=target_prefix, sample_temperature=sample_temperature)
        start = _start(decoder_start, tokenizer)
        return [target_row(r, list(target_prefix) + out, tokenizer, max_len, start) for r, out in zip(rows, outputs)]

    def generate(self, model, rows, tokenizer, device, *, num_beams: int = 1, max_new_tokens: int | None = None,
                 batch_size: int = GENERATE_BATCH, decoder_start: int | None = None,
                 target_prefix: list[int] = (), sample_temperature: float | None = None) -> list[list[int]]:
        """Each row's decoded target tokens (greedy, beam search, or sampling at `sample_temperature`): the
        decoder start token dropped, then the target prefix (BART's <s>, which its generation config forces), cut
        before the first end-of-sequence token. `max_new_tokens` defaults to the longest label of `rows`."""
        import torch

        if max_new_tokens is None:
            max_new_tokens = max((len(r["labels"]) for r in rows if "labels" in r), default=32)
        eos = end_token_id(tokenizer)
        start = _start(decoder_start, tokenizer)
        prefix = list(target_prefix)
        model.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(rows), batch_size):
                batch = tokenizer.pad([{k: r[k] for k in ("input_ids", "attention_mask")}
                                       for r in rows[i : i + batch_size]], return_tensors="pt")
                ids = model.generate(input_ids=batch["input_ids"].to(device),
                                     attention_mask=batch["attention_mask"].to(device),
                                     max_new_tokens=max_new_tokens, decoder_start_token_id=start,
                                     eos_token_id=eos, pad_token_id=_pad_id(tokenizer),
                                     **decoding(num_beams, sample_temperature))
                for seq in ids[:, 1:].tolist():  # position 0 is the decoder start token
                    if prefix and seq[: len(prefix)] == prefix:
                        seq = seq[len(prefix):]
                    out.append(seq[: seq.index(eos)] if eos in seq else seq)
        return out

    def encode(self, rows, tokenizer, max_len, decoder_start: int | None = None, target_prefix: list[int] = ()):
        if not rows:
            return []
        src = tokenizer([r["source"] for r in rows], truncation=True, max_length=max_len)
        targets = tokenizer([r["target"] for r in rows], add_special_tokens=False)["input_ids"]
        start = _start(decoder_start, tokenizer)
        return [target_row({"input_ids": src["input_ids"][i], "attention_mask": src["attention_mask"][i]},
                           list(target_prefix) + ids, tokenizer, max_len, start) for i, ids in enumerate(targets)]

    def collator(self, tokenizer, decoder_start: int | None = None, target_prefix: list[int] = ()):
        return Seq2SeqCollator(tokenizer, decoder_start, target_prefix)

    def texts(self, rows):
        return [t for r in rows for t in (r["source"], r["target"])]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _start(decoder_start: int | None, tokenizer) -> int:
    """The decoder start token: the pair's (Seq2Seq.pair_options), or else the pad token (T5's convention)."""
    return decoder_start if decoder_start is not None else _pad_id(tokenizer)


def target_prefix(tokenizer) -> list[int]:
    """The special tokens a pretrained tokenizer puts before a text (BART's <s>; none for T5): a pretrained
    model's targets begin with them, as its own fine-tuning recipe builds them."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i]
    return []


def reference_ids(labels, tokenizer) -> list[int]:
    """A row's labels as the reference tokens: padding and the end token removed."""
    eos = end_token_id(tokenizer)
    return [t for t in labels if t != IGNORE and t != eos]


def target_row(row: dict, target: list[int], tokenizer, max_len: int, start: int) -> dict:
    """`row` with `target` token ids (no end token) as its labels and, behind `start`, its decoder inputs, encoded
    as `encode` does."""
    eos = end_token_id(tokenizer)
    labels = (list(target) + ([eos] if eos is not None else []))[:max_len]
    return {**row, "decoder_input_ids": [start] + labels[:-1], "labels": labels}


class Seq2SeqCollator:
    """Pads source inputs with the pad token, `decoder_input_ids` with the pad token and labels with IGNORE,
    each to its own longest row: (B, Ls) and (B, Lt). It also carries the pair's decoding settings
    (Seq2Seq.pair_options), which the generation metrics need."""

    def __init__(self, tokenizer, decoder_start: int | None = None, target_prefix: list[int] = ()):
        self.tokenizer, self.decoder_start, self.target_prefix = tokenizer, decoder_start, list(target_prefix)

    def __call__(self, rows):
        import torch

        pad = _pad_id(self.tokenizer)  # positions past a target's end: masked out of the loss
        batch = dict(self.tokenizer.pad([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows],
                                        return_tensors="pt"))
        for key, fill in (("decoder_input_ids", pad), ("labels", IGNORE)):
            if all(key in r for r in rows):
                n = max(len(r[key]) for r in rows)
                batch[key] = torch.tensor([list(r[key]) + [fill] * (n - len(r[key])) for r in rows])
        return batch
