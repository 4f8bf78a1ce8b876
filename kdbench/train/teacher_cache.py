"""A frozen teacher's outputs computed once, before training, and fed to the Distiller with every batch.

Classifiers: the teacher's logits per row (`cache_teacher_logits`). Language models: each logit position's top-k
tokens, or tokens drawn from the teacher, with their log-probabilities (`cache_teacher_top_k`), saved to and
loaded from disk, and batched by `TopKCollator`. A frozen teacher in eval mode gives the same outputs every epoch,
seed and method, so its forward pass then runs once.
"""

from __future__ import annotations

import logging
import math
import time
import zlib

import torch

from kdbench.models import model_inputs

log = logging.getLogger(__name__)


TEACHER_LOGITS_BATCH = 256


def cache_teacher_logits(teacher, rows: list[dict], collator, device: str,
                         batch_size: int = TEACHER_LOGITS_BATCH) -> list[dict]:
    """Rows with the frozen teacher's logits attached as `teacher_logits` (one inference pass over the data)."""
    teacher.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            batch = collator([{k: v for k, v in r.items() if k != "labels"} for r in chunk])
            batch = model_inputs({k: v.to(device) for k, v in batch.items()}, teacher)
            logits = teacher(**batch).logits.float().cpu()
            out += [{**r, "teacher_logits": logits[j].tolist()} for j, r in enumerate(chunk)]
    return out


TOP_K_LOGITS = 1 << 26  # teacher logits per batch while caching its top-k (256 MB of fp32), whatever L and V


def cache_teacher_top_k(teacher, rows: list[dict], collator, device: str, *, k: int, temperature: float,
                        sampled: bool = False) -> list[dict]:
    """Rows of a language-model task with the frozen teacher's k most likely tokens at each logit position attached
    (kdbench.kernels.teacher_top_k at `temperature`): `teacher_top_log_probs` (Lt, k + 1) fp32 and
    `teacher_top_ids` (Lt, k) int32, Lt the row's label length (its logit positions). `sampled`: k tokens drawn
    from the teacher instead (kdbench.kernels.teacher_samples), by a generator seeded from each batch's first row,
    so that the draws do not depend on the process or on what ran before. One inference pass; only about
    TOP_K_LOGITS teacher logits exist at a time."""
    from kdbench.kernels import teacher_samples, teacher_top_k

    start = time.perf_counter()
    teacher.eval()
    vocab = teacher.get_output_embeddings().weight.shape[0]
    longest = max((len(r["labels"]) for r in rows), default=1)
    batch_size = max(1, min(TEACHER_LOGITS_BATCH, TOP_K_LOGITS // (longest * vocab)))
    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            batch = {key: v.to(device) for key, v in collator(chunk).items() if key != "labels"}
            logits = teacher(**model_inputs(batch, teacher)).logits
            if sampled:
                seed = zlib.crc32(str(list(chunk[0]["input_ids"])).encode())
                generator = torch.Generator(device=logits.device).manual_seed(seed)
                log_probs, ids = teacher_samples(logits, k, temperature=temperature, generator=generator)
            else:
                log_probs, ids = teacher_top_k(logits, k, temperature=temperature)
            log_probs, ids = log_probs.cpu(), ids.cpu()
            out += [{**r, TopKCollator.KEYS[0]: log_probs[j, : len(r["labels"])].clone(),
                     TopKCollator.KEYS[1]: ids[j, : len(r["labels"])].clone()} for j, r in enumerate(chunk)]
    log.info("teacher %s %d cached for %d rows in %.1f s", "samples" if sampled else "top", k, len(rows),
             time.perf_counter() - start)
    return out


TOP_K_FILE = "teacher_top_k.pt"


def save_teacher_top_k(path, rows: list[dict]) -> None:
    """The top-k that `cache_teacher_top_k` attached to `rows`, saved to `path` as three tensors: the rows' lengths
    and every row's log-probabilities and token ids, concatenated."""
    log_probs, ids = ([r[key] for r in rows] for key in TopKCollator.KEYS)
    torch.save({"lengths": torch.tensor([len(x) for x in ids], dtype=torch.long),
                "log_probs": torch.cat(log_probs), "ids": torch.cat(ids)}, path)


def load_teacher_top_k(path, rows: list[dict]) -> list[dict] | None:
    """`rows` with the top-k saved at `path` attached again; None if they were not saved for rows of these
    lengths."""
    saved = torch.load(path, weights_only=True)
    lengths = saved["lengths"].tolist()
    if lengths != [len(r["labels"]) for r in rows]:
        return None
    log_probs, ids = saved["log_probs"].split(lengths), saved["ids"].split(lengths)
    return [{**r, TopKCollator.KEYS[0]: a, TopKCollator.KEYS[1]: b} for r, a, b in zip(rows, log_probs, ids)]


class TopKCollator:
    """A task's collator for rows that carry a cached teacher's top-k (`cache_teacher_top_k`): the task's batch,
    plus `teacher_top_log_probs` (B, Lt, k + 1) and `teacher_top_ids` (B, Lt, k), padded to the batch's label
    length Lt. Padded positions, labelled IGNORE, get a uniform distribution over the buckets (never read)."""

    KEYS = ("teacher_top_log_probs", "teacher_top_ids")

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows):
        batch = self.collator([{k: v for k, v in r.items() if k not in self.KEYS} for r in rows])
        length = batch["labels"].shape[-1]
        log_probs, ids = ([r[key] for r in rows] for key in self.KEYS)
        uniform = -math.log(log_probs[0].shape[-1])
        batch[self.KEYS[0]] = torch.stack([_pad_rows(x, length, uniform) for x in log_probs])
        batch[self.KEYS[1]] = torch.stack([_pad_rows(x, length, 0) for x in ids])
        return batch

    @classmethod
    def pop(cls, inputs: dict):
        """(log_probs, token_ids) taken out of a batch, or None if it carries no cached top-k."""
        if cls.KEYS[0] not in inputs:
            return None
        return inputs.pop(cls.KEYS[0]), inputs.pop(cls.KEYS[1])


def _pad_rows(x: torch.Tensor, length: int, fill) -> torch.Tensor:
    """`x` (L, ...) padded with `fill` to `length` rows."""
    return torch.cat([x, x.new_full((length - x.shape[0], *x.shape[1:]), fill)]) if x.shape[0] < length else x
