"""kd_loss against a cached teacher that kept only k tokens per row: its k most likely, or k it drew.

A frozen teacher's logits for a fixed input never change, so a suite could run the teacher once and reuse its
outputs in every epoch, seed and method (as it does for classifiers, whose logits are a few numbers per example).
A language model's are (L, V) per block: 4.2 GB of fp32 per 8192 tokens at Llama 3's V = 128256. What is kept
instead is each row's k largest logits' token ids and their log-probabilities at the temperature T, plus one more
column: the log of the probability mass of every other token (the tail). That is 8 k + 4 bytes per row.

The student's row is coarsened the same way (its log-probabilities at T of the teacher's k tokens, and the log of
its own mass on all the others), and the divergence is taken between the two (k + 1)-bucket distributions:

    loss_i = alpha * T^2 * D(p_buckets || q_buckets)  +  (1 - alpha) * CE(student_i at T = 1, label_i)

- This is the divergence between the two distributions seen through the partition {each top-k token, the rest}.
  It keeps the teacher's true probabilities, where renormalising the k kept logits would inflate them. Either way
  a top-k teacher is a biased estimate of the whole one (Anshumann et al., 2025, "Sparse Logit Sampling", measure
  the cost in accuracy and calibration).
- It is a lower bound on the full divergence (data processing), and with k >= V it is the full kd_loss.
- The student's tail is asked to hold the right total mass, not the right shape.

`teacher_samples` fills the same format from n tokens drawn from the teacher instead of its k largest (that
paper's random-sampling KD, with the teacher itself as the proposal): with forward KL its gradient is unbiased,
where top-k's is not.

The bucket divergence is kd_loss itself, on (N, k + 1) log-probabilities at T = 1 (the Triton kernel on a GPU);
the coarsening and the cross-entropy are PyTorch ops, differentiated by autograd. Like kd_loss, it walks the rows
in chunks and takes each chunk's gradient in the forward pass, so that its extra memory is the gradient plus a few
(chunk, V) temporaries, whatever N.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdbench.kernels.front import DIVERGENCES, REDUCTIONS, KdLossInputError, kd_loss


def teacher_top_k(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0):
    """(log_probs (..., k + 1) fp32 (fp64 for fp64 logits), token_ids (..., k) int32): each row's k most likely
    tokens and their log-probabilities at `temperature`, the last column the log of every other token's mass
    (-inf when k >= V, where k is cut to V). What `top_k_kd_loss` takes as the teacher."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise KdLossInputError(f"teacher_top_k: k must be a positive integer, got {k!r}")
    if temperature <= 0:
        raise KdLossInputError(f"teacher_top_k: temperature must be > 0, got {temperature}")
    z = teacher_logits.to(_arithmetic(teacher_logits)) / temperature
    top, ids = z.topk(min(k, z.shape[-1]), dim=-1)
    lse = z.logsumexp(-1, keepdim=True)
    return torch.cat([top - lse, _rest_logsumexp(z, ids) - lse], dim=-1), ids.to(torch.int32)


def teacher_samples(teacher_logits: torch.Tensor, n: int, *, temperature: float = 1.0, generator=None):
    """`teacher_top_k`'s format from n tokens drawn per row from softmax(teacher / temperature), with replacement:
    (log_probs (..., n + 1), token_ids (..., n)), each drawn token's log share of the draws; columns a row did not
    fill (fewer than n distinct tokens drawn) hold other tokens at log 0 = -inf, and so does the tail column.

    Random-sampling KD (Anshumann et al., 2025, "Sparse Logit Sampling") with the teacher at T as its own proposal,
    so every draw weighs the same (the paper's importance weights allow other proposals): the shares are unbiased
    estimates of the teacher's probabilities, so with forward KL the gradient of `top_k_kd_loss` against them is
    an unbiased estimate of the full loss's, where a top-k teacher's is not. `generator` draws them
    (torch.multinomial)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise KdLossInputError(f"teacher_samples: n must be a positive integer, got {n!r}")
    if temperature <= 0:
        raise KdLossInputError(f"teacher_samples: temperature must be > 0, got {temperature}")
    z = teacher_logits.to(_arithmetic(teacher_logits)) / temperature
    rows = z.reshape(-1, z.shape[-1])
    draws = torch.multinomial(F.softmax(rows, -1), n, replacement=True, generator=generator)
    counts = torch.zeros_like(rows).scatter_add_(-1, draws, torch.ones_like(draws, dtype=rows.dtype))
    drawn, ids = counts.topk(min(n, rows.shape[-1]), dim=-1)  # the drawn tokens first, then undrawn fillers
    tail = torch.full_like(drawn[:, :1], float("-inf"))
    log_probs = torch.cat([(drawn / n).log(), tail], dim=-1)
    return log_probs.reshape(*z.shape[:-1], -1), ids.to(torch.int32).reshape(*z.shape[:-1], -1)


def _arithmetic(x: torch.Tensor) -> torch.dtype:
    """fp32 whatever the input's precision, as in kd_loss; fp64 for fp64 inputs (the tests' oracle)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rest_logsumexp(z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row of `z` without the columns `ids` (..., 1): the tail's mass, summed directly rather
    than as 1 - (the kept mass), which cancels to nothing when the kept tokens hold nearly all of it."""
    return z.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)


TAILS = ("bucket", "uniform")


def top_k_kd_loss(student_logits, teacher_log_probs, teacher_token_ids, labels=None, *, temperature=1.0,
                  alpha=0.5, divergence="forward_kl", beta=0.5, ignore_index=-100, reduction="batchmean",
                  tail="bucket"):
    """kd_loss with the teacher given by `teacher_top_k(teacher_logits, k, temperature=temperature)`.

    Shapes: student_logits (N, V) or (B, L, V); teacher_log_probs (..., k + 1) and teacher_token_ids (..., k) with
    the same leading dims; labels (N,) or (B, L). The loss, valid rows, labels=None and reductions are kd_loss's
    (see KD_LOSS_DOC), with D taken over the k + 1 buckets; the teacher's log-probabilities must have been made at
    this `temperature`. Gradients flow to student_logits only. With k >= V, this is kd_loss(student_logits,
    teacher_logits, ...) exactly. A token id outside the student's vocabulary is refused on CPU tensors (on a GPU
    that check would cost a host sync every step).

    tail: "bucket" (above), or "uniform": the teacher's tail mass spread evenly over the V - k other tokens and the
    full kd_loss taken against that (V,)-row teacher, one fused call. Against the bucket divergence, forward KL adds
    p_tail * KL(uniform || the student's tail, renormalised): it also asks the student's tail to be flat.
    """
    name = "top_k_kd_loss"
    s, lp, ids = student_logits, teacher_log_probs, teacher_token_ids
    if s.dim() < 2 or ids.dim() != s.dim() or lp.shape[:-1] != s.shape[:-1] or ids.shape[:-1] != s.shape[:-1]:
        raise KdLossInputError(f"{name}: student_logits {tuple(s.shape)}, teacher_log_probs {tuple(lp.shape)} and "
                               f"teacher_token_ids {tuple(ids.shape)} must share their leading dims")
    k, vocab = ids.shape[-1], s.shape[-1]
    if lp.shape[-1] != k + 1:
        raise KdLossInputError(f"{name}: teacher_log_probs must have k + 1 = {k + 1} columns (the k tokens, then "
                               f"the tail), got {lp.shape[-1]}")
    if ids.is_floating_point():
        raise KdLossInputError(f"{name}: teacher_token_ids must be integers, got {ids.dtype}")
    # checked on the CPU only, as kd_loss's labels: on a GPU it would cost a host sync every step
    if ids.numel() and not ids.is_cuda and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise KdLossInputError(f"{name}: teacher token id {int(ids.max())} is outside the student's vocabulary "
                               f"of {vocab}: teacher and student need one vocabulary")
    if labels is not None and tuple(labels.shape) != tuple(s.shape[:-1]):
        raise KdLossInputError(f"{name}: labels shape {tuple(labels.shape)} does not match the logits' leading "
                               f"dims {tuple(s.shape[:-1])}")
    if tail not in TAILS:
        raise KdLossInputError(f"{name}: tail must be one of {TAILS}, got {tail!r}")
    if divergence not in DIVERGENCES or reduction not in REDUCTIONS or temperature <= 0:
        raise KdLossInputError(f"{name}: divergence {divergence!r} (one of {DIVERGENCES}), reduction "
                               f"{reduction!r} (one of {REDUCTIONS}), temperature {temperature} (> 0)")

    options = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, ignore_index=ignore_index,
                   tail=tail)
    need_grad = torch.is_grad_enabled() and s.requires_grad
    return _TopKKd.apply(s.reshape(-1, vocab), lp.reshape(-1, k + 1), ids.reshape(-1, k),
                         None if labels is None else labels.reshape(-1), reduction, need_grad, options)


# Rows per chunk: about this many logits, so that the few (rows, V) fp32 temporaries of a chunk stay small
# (64 MB each) whatever N; 8192 x 128256 logits go in 64 chunks of 130 rows.
CHUNK_ELEMENTS = 1 << 24


class _TopKKd(torch.autograd.Function):
    """The loss chunk by chunk over the rows, each chunk's gradient taken at once (as kd_loss does, in the forward
    pass): only one chunk's temporaries exist at a time, and backward scales the stored gradient by grad_output."""

    @staticmethod
    def forward(ctx, rows, lp, ids, labels, reduction, need_grad, options):
        n, vocab = rows.shape
        losses = torch.zeros(n, dtype=_arithmetic(rows), device=rows.device)
        grad = torch.empty_like(rows) if need_grad else None
        step = max(1, CHUNK_ELEMENTS // vocab)
        for i in range(0, n, step):
            leaf = rows[i : i + step].detach().requires_grad_(need_grad)
            with torch.enable_grad():  # a Function's forward runs without grad mode
                part = _row_losses(leaf, lp[i : i + step], ids[i : i + step],
                                   None if labels is None else labels[i : i + step], **options)
                if need_grad:
                    grad[i : i + step] = torch.autograd.grad(part.sum(), leaf)[0]
            losses[i : i + step] = part.detach()
        ctx.reduction = reduction
        if reduction == "none":
            out = losses
        elif reduction == "sum":
            out = losses.sum()
        else:  # batchmean: the count of valid rows stays on the device (no host sync)
            valid = max(1, n) if labels is None else (labels != options["ignore_index"]).sum().clamp(min=1)
            out = losses.sum() / valid
            if need_grad:
                grad.div_(valid)
        if need_grad:
            ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad = grad * grad_output[:, None].to(grad.dtype)
        elif not bool((grad_output == 1).all()):
            grad = grad * grad_output.to(grad.dtype)
        return grad, None, None, None, None, None, None


def _row_losses(rows, lp, ids, labels, *, temperature, alpha, divergence, beta, ignore_index, tail):
    """(n,) per-row losses of `rows` (n, V) against the cached teacher rows `lp` (n, k + 1), `ids` (n, k)."""
    k, vocab = ids.shape[-1], rows.shape[-1]
    if tail == "uniform":
        return kd_loss(rows, uniform_tail(lp, ids, vocab) * temperature, labels, temperature=temperature,
                       alpha=alpha, divergence=divergence, beta=beta, ignore_index=ignore_index, reduction="none")
    exact = _arithmetic(rows)
    ids, lp = ids.long(), lp.to(exact)
    z = rows.to(exact) / temperature
    lse = z.logsumexp(-1, keepdim=True)
    student = z.gather(-1, ids) - lse
    if k < vocab:
        student = torch.cat([student, _rest_logsumexp(z, ids) - lse], dim=-1)
    else:  # every token kept: no tail, on either side
        lp = lp[:, :k]
    # kd_loss on the buckets: log-probabilities are logits whose softmax at T = 1 is the distribution itself.
    # Its labels only mark the valid rows (alpha = 1: its CE over the buckets is weighted 0).
    marks = None if labels is None else torch.where(labels != ignore_index, 0, ignore_index)
    per_row = alpha * temperature**2 * kd_loss(student, lp, marks, temperature=1.0, alpha=1.0,
                                               divergence=divergence, beta=beta, ignore_index=ignore_index,
                                               reduction="none")
    if labels is not None and alpha < 1:
        per_row = per_row + (1 - alpha) * F.cross_entropy(rows.to(exact), labels.long(), ignore_index=ignore_index,
                                                          reduction="none")
    return per_row


def uniform_tail(teacher_log_probs: torch.Tensor, teacher_token_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """(..., V) log-probabilities: the k kept tokens' own, and the tail's mass shared evenly by the other V - k."""
    k = teacher_token_ids.shape[-1]
    spread = teacher_log_probs[..., k:] - math.log(max(1, vocab - k))
    dense = spread.expand(*teacher_log_probs.shape[:-1], vocab).clone()
    return dense.scatter(-1, teacher_token_ids.long(), teacher_log_probs[..., :k])
