"""Exact PyTorch reference for the distillation loss: the CPU path and the test oracle of kernels/kd_loss.py.

It runs on any device (KDBENCH_KERNEL=torch on CUDA tensors gives an A/B check of the kernel).

It is chunked over rows and computes the gradient w.r.t. the student logits analytically in the forward pass,
exactly as the Triton kernel does, so it never holds more than a few (chunk, V) fp32 temporaries, whatever N.
Its formulas are checked against float64 autograd in tests/test_kd_loss.py.
"""

from __future__ import annotations

import math

import torch

from kdbench.errors import KdbenchError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "none")

KD_LOSS_DOC = """Knowledge-distillation loss: soft-target divergence + hard-label cross-entropy + feature MSE.

    kd_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, alpha=0.5,
            divergence="forward_kl", beta=0.5, ignore_index=-100, reduction="batchmean",
            student_features=None, teacher_features=None, feature_weight=0.0)

Shapes: logits (N, V) or (B, L, V), flattened to (N, V) rows; labels (N,) or (B, L); features (M, H) or (B, L, H),
the student's already projected to the teacher's width H. Logits may be fp32, bf16 or fp16 (fp64 on the reference
path); teacher and student dtypes may differ.

Per row i (p = softmax, T = temperature):
    loss_i = alpha * T^2 * D(p_t || p_s)  +  (1 - alpha) * CE_i
    p_t = softmax(teacher_i / T),  p_s = softmax(student_i / T),  CE_i = -log softmax(student_i)[label_i]  (T = 1)
T^2 scales the soft term only (it keeps the soft gradient's size independent of T, Hinton et al. 2015).
divergence:
    "forward_kl"  D = KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)          (mean-seeking, the classic KD)
    "reverse_kl"  D = KL(p_s || p_t)                                          (mode-seeking)
    "jsd"         D = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m),  m = beta * p_t + (1 - beta) * p_s
                  (generalized JSD, the convention of TRL's GKD and Liger's JSD; beta must lie in (0, 1): at 0 or 1
                  this D is identically 0, so TRL's special cases beta=0 / beta=1 are divergence="forward_kl" /
                  "reverse_kl" here.)
Valid rows: rows whose label == ignore_index drop out of every logit term (loss 0, gradient 0). With labels=None
every row is valid and the CE term is absent: the loss is alpha * T^2 * D, the (1 - alpha) share is not
redistributed (pass alpha=1.0 for pure distillation).
reduction:
    "batchmean"  sum of row losses / number of valid rows (an all-ignored batch gives 0 and zero gradients)
    "sum"        sum of row losses
    "none"       per-row losses (N,), 0 on ignored rows
Feature term (only when feature_weight != 0; then both feature tensors are required and of equal shape):
    feature_weight * mean over all M*H elements of (student_features - teacher_features)^2   (as F.mse_loss)
It ignores labels and is added once to the "batchmean" and "sum" results. With reduction="none" it needs
M == N and row i gets feature_weight * mean_h (student_features[i] - teacher_features[i])^2, so that
loss.mean() over all N rows equals the logit mean plus the feature term.
Gradients flow to student_logits and student_features only. The teacher tensors get none: they may or may not
require grad, and their .grad is never written (treat the teacher as frozen, as in TRL's GKD).
Output: a float32 loss (float64 for float64 inputs), scalar, or (N,) for "none".
Masked vocabulary: -inf logits are allowed. A vocab entry with p = 0 contributes 0 (never 0 * -inf = NaN); a row
needs at least one finite logit in each distribution. A divergence that is truly infinite (forward KL with
p_t > 0 where p_s = 0) is returned as inf, not NaN.
Errors (ValueError, one line): teacher vocab larger than the student's (slicing teacher_logits[..., :V] is the
caller's choice), other shape mismatches, labels of the wrong shape or out of range (checked on CPU only: the CUDA
kernel skips checks that need a device sync), an unknown divergence or reduction, temperature <= 0, beta outside
(0, 1) for "jsd", feature_weight != 0 without features.
Backward: the gradient is computed in the forward pass and stored in the student logits' dtype (the only
(N, V) buffer besides the inputs); backward scales it by grad_output. It runs once per forward
(retain_graph=True with a second backward and grad_output != 1 raises).
"""


class KdLossInputError(KdbenchError, ValueError):
    """Bad arguments to kd_loss: one line that names the argument at fault."""


# ----------------------------------------------------------------------------------------------------------------
# Validation, shared with the Triton kernel.
# ----------------------------------------------------------------------------------------------------------------


def validate(
    student_logits,
    teacher_logits,
    labels,
    *,
    temperature,
    alpha,
    divergence,
    beta,
    ignore_index,
    reduction,
    student_features,
    teacher_features,
    feature_weight,
):
    """Check the arguments; return (s (N, V), t (N, V), labels (N,) or None, (fs (M, H), ft (M, H)) or None).

    Label range is checked only for CPU labels: on CUDA it would cost a host sync every step.
    """
    if not isinstance(student_logits, torch.Tensor) or not isinstance(teacher_logits, torch.Tensor):
        raise KdLossInputError("kd_loss: student_logits and teacher_logits must be tensors")
    if student_logits.dim() < 2:
        raise KdLossInputError(
            f"kd_loss: student_logits must be (N, V) or (B, L, V), got shape {tuple(student_logits.shape)}"
        )
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise KdLossInputError(
            f"kd_loss: logits must be floating point, got {student_logits.dtype} and {teacher_logits.dtype}"
        )
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise KdLossInputError(
            f"kd_loss: shape mismatch: student_logits {tuple(student_logits.shape)} vs teacher_logits "
            f"{tuple(teacher_logits.shape)} (leading dims must agree)"
        )
    if vt > vs:
        raise KdLossInputError(
            f"kd_loss: teacher vocab {vt} is larger than the student's {vs}; slicing teacher_logits[..., :{vs}] "
            "is the caller's choice"
        )
    if vt != vs:
        raise KdLossInputError(
            f"kd_loss: shape mismatch: teacher vocab {vt} is smaller than the student's {vs}; padding "
            "teacher_logits with -inf (probability 0) is the caller's choice"
        )
    if vs == 0:
        raise KdLossInputError("kd_loss: the vocab dimension is empty")
    if student_logits.device != teacher_logits.device:
        raise KdLossInputError(
            f"kd_loss: student_logits on {student_logits.device} but teacher_logits on {teacher_logits.device}"
        )
    if divergence not in DIVERGENCES:
        raise KdLossInputError(f"kd_loss: unknown divergence {divergence!r}; available: {', '.join(DIVERGENCES)}")
    if reduction not in REDUCTIONS:
        raise KdLossInputError(f"kd_loss: unknown reduction {reduction!r}; available: {', '.join(REDUCTIONS)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise KdLossInputError(f"kd_loss: temperature must be a number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise KdLossInputError(f"kd_loss: temperature must be finite and > 0, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise KdLossInputError(f"kd_loss: alpha must be a number in [0, 1], got {alpha!r}")
    if divergence == "jsd" and not (isinstance(beta, (int, float)) and 0.0 < beta < 1.0):
        raise KdLossInputError(
            f"kd_loss: beta must lie in (0, 1) for divergence='jsd', got {beta!r} "
            "(TRL's beta=0 is divergence='forward_kl' and beta=1 is 'reverse_kl')"
        )
    if not isinstance(feature_weight, (int, float)) or not math.isfinite(feature_weight):
        raise KdLossInputError(f"kd_loss: feature_weight must be a finite number, got {feature_weight!r}")

    s2d = student_logits.reshape(-1, vs)
    t2d = teacher_logits.reshape(-1, vt)
    n = s2d.shape[0]

    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != student_logits.shape[:-1]:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise KdLossInputError(
                f"kd_loss: labels shape {got} does not match the logits' leading dims "
                f"{tuple(student_logits.shape[:-1])}"
            )
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise KdLossInputError(f"kd_loss: labels must be an integer tensor, got {labels.dtype}")
        if labels.device != student_logits.device:
            raise KdLossInputError(f"kd_loss: labels on {labels.device} but logits on {student_logits.device}")
        labels = labels.reshape(-1)
        if labels.device.type == "cpu" and n > 0:
            bad = (labels != ignore_index) & ((labels < 0) | (labels >= vs))
            if bool(bad.any()):
                first = int(labels[bad][0])
                raise KdLossInputError(
                    f"kd_loss: label {first} is out of range for vocab {vs} (and is not ignore_index={ignore_index})"
                )

    feats = None
    if feature_weight != 0.0:
        if student_features is None or teacher_features is None:
            raise KdLossInputError("kd_loss: feature_weight != 0 needs both student_features and teacher_features")
        if student_features.shape != teacher_features.shape:
            raise KdLossInputError(
                f"kd_loss: feature shape mismatch: student_features {tuple(student_features.shape)} vs "
                f"teacher_features {tuple(teacher_features.shape)} (project the student's to the teacher's width)"
            )
        if student_features.dim() < 1 or student_features.numel() == 0:
            raise KdLossInputError(f"kd_loss: features must be non-empty, got {tuple(student_features.shape)}")
        if not student_features.is_floating_point() or not teacher_features.is_floating_point():
            raise KdLossInputError("kd_loss: features must be floating point")
        if student_features.device != student_logits.device or teacher_features.device != student_logits.device:
            raise KdLossInputError("kd_loss: features must be on the logits' device")
        h = student_features.shape[-1]
        fs = student_features.reshape(-1, h)
        ft = teacher_features.reshape(-1, h)
        if reduction == "none" and fs.shape[0] != n:
            raise KdLossInputError(
                f"kd_loss: reduction='none' with features needs one feature row per logit row: "
                f"{fs.shape[0]} feature rows vs {n} logit rows"
            )
        feats = (fs, ft)
    return s2d, t2d, labels, feats


def loss_dtype(student_logits: torch.Tensor) -> torch.dtype:
    """float32 for fp32/bf16/fp16 logits, float64 for float64 logits."""
    return torch.promote_types(student_logits.dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# The chunked reference.
# ----------------------------------------------------------------------------------------------------------------

# Rows per chunk: about 2^22 elements (16 MB in fp32) per temporary; a chunk makes about ten of them.
_CHUNK_ELEMS = 1 << 22


def _zero_where_no_mass(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p * x with the convention 0 * anything = 0 (masked vocab: p = 0 where the log-prob is -inf)."""
    return torch.where(p > 0, p * x, 0.0)


def _rows_forward(s, t, lab, *, temperature, alpha, divergence, beta, ignore_index, want_grad):
    """One chunk: s, t (C, V) in the compute dtype. Returns (loss (C,), grad (C, V) or None, valid (C,) bool).

    loss and grad are unreduced and already zero on ignored rows.
    """
    c = s.shape[0]
    T = float(temperature)
    loss = torch.zeros(c, dtype=s.dtype, device=s.device)
    grad = torch.zeros_like(s) if want_grad else None
    valid = torch.ones(c, dtype=torch.bool, device=s.device) if lab is None else lab != ignore_index

    if alpha != 0.0:
        ls = torch.log_softmax(s / T, dim=-1)
        lt = torch.log_softmax(t / T, dim=-1)
        ps, pt = ls.exp(), lt.exp()
        if divergence == "forward_kl":
            d = _zero_where_no_mass(pt, lt - ls).sum(-1)
            g = ps - pt if want_grad else None
        elif divergence == "reverse_kl":
            d = _zero_where_no_mass(ps, ls - lt).sum(-1)
            g = _zero_where_no_mass(ps, ls - lt - d[:, None]) if want_grad else None
        else:  # jsd
            lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
            kl_tm = _zero_where_no_mass(pt, lt - lm).sum(-1)
            kl_sm = _zero_where_no_mass(ps, ls - lm).sum(-1)
            d = beta * kl_tm + (1.0 - beta) * kl_sm
            g = (1.0 - beta) * _zero_where_no_mass(ps, ls - lm - kl_sm[:, None]) if want_grad else None
        # d/ds of alpha * T^2 * D(softmax(s / T)) = alpha * T * dD/dz at z = s / T.
        loss += alpha * T * T * d
        if want_grad:
            grad += (alpha * T) * g
        del ls, lt, ps, pt, g

    if alpha != 1.0 and lab is not None:
        l1 = torch.log_softmax(s, dim=-1)
        safe = torch.where(valid, lab, 0)
        ce = -l1.gather(1, safe[:, None].long()).squeeze(1)
        loss += (1.0 - alpha) * ce
        if want_grad:
            q = l1.exp_()
            q.scatter_add_(1, safe[:, None].long(), -torch.ones(c, 1, dtype=q.dtype, device=q.device))
            grad += (1.0 - alpha) * q

    loss = torch.where(valid, loss, 0.0)
    if want_grad:  # where, not a multiply: an ignored padding row may hold NaN or all -inf
        grad = torch.where(valid[:, None], grad, 0.0)
    return loss, grad, valid


def _feature_forward(fs, ft, feature_weight, reduction, want_grad):
    """Feature MSE. Returns (term, grad (M, H) or None): term is (M,) per-row for 'none', a scalar otherwise."""
    cdt = torch.promote_types(fs.dtype, torch.float32)
    diff = fs.to(cdt) - ft.to(cdt)
    m, h = diff.shape
    if reduction == "none":
        term = feature_weight * (diff * diff).mean(-1)
        grad = (2.0 * feature_weight / h) * diff if want_grad else None
    else:
        term = feature_weight * (diff * diff).mean()
        grad = (2.0 * feature_weight / (m * h)) * diff if want_grad else None
    return term, (grad.to(fs.dtype) if grad is not None else None)


def _scale_rows_(grad: torch.Tensor, go: torch.Tensor) -> None:
    """grad (N, X) *= go (N,) or scalar, in place, chunked, with the product taken in fp32 or wider."""
    cdt = torch.promote_types(grad.dtype, torch.float32)
    n, v = grad.shape
    go = go.to(grad.device)
    if go.dim() == 0:
        if grad.dtype == cdt:
            grad.mul_(go.to(cdt))
            return
        go = go.expand(n)
    step = max(1, _CHUNK_ELEMS // max(v, 1))
    for i in range(0, n, step):
        blk = grad[i : i + step]
        blk.copy_(blk.to(cdt) * go[i : i + step, None].to(cdt))


class _KdLossReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, labels, fs, ft, opts, want_grad_s, want_grad_f):
        n, v = s.shape
        cdt = torch.promote_types(s.dtype, torch.float32)
        out_dt = cdt
        rows = torch.zeros(n, dtype=out_dt, device=s.device)
        grad = torch.empty((n, v), dtype=s.dtype, device=s.device) if want_grad_s else None
        n_valid = 0
        step = max(1, _CHUNK_ELEMS // v)
        for i in range(0, n, step):
            lab = labels[i : i + step] if labels is not None else None
            loss_c, grad_c, valid_c = _rows_forward(
                s[i : i + step].to(cdt),
                t[i : i + step].to(cdt),
                lab,
                want_grad=want_grad_s,
                **{k: opts[k] for k in ("temperature", "alpha", "divergence", "beta", "ignore_index")},
            )
            rows[i : i + step] = loss_c
            if want_grad_s:
                grad[i : i + step] = grad_c
            n_valid += int(valid_c.sum())

        reduction = opts["reduction"]
        if reduction == "none":
            loss = rows
        else:
            scale = 1.0 / max(n_valid, 1) if reduction == "batchmean" else 1.0
            loss = rows.sum() * scale
            if want_grad_s and scale != 1.0:
                _scale_rows_(grad, torch.tensor(scale, dtype=cdt, device=grad.device))

        grad_f = None
        if fs is not None:
            term, grad_f = _feature_forward(fs, ft, opts["feature_weight"], reduction, want_grad_f)
            loss = loss + term.to(out_dt)
        ctx.reduction = reduction
        ctx.scaled = False
        ctx.save_for_backward(grad, grad_f)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        if ctx.scaled:  # the stored gradient was already scaled in place by an earlier backward
            raise RuntimeError(
                "kd_loss: a second backward through the same forward after a grad_output != 1 is not supported"
            )
        grad, grad_f = ctx.saved_tensors
        if ctx.reduction != "none" and bool(go == 1):
            return grad, None, None, grad_f, None, None, None, None
        ctx.scaled = True
        if grad is not None:
            _scale_rows_(grad, go)
        if grad_f is not None:
            _scale_rows_(grad_f, go)
        return grad, None, None, grad_f, None, None, None, None


def kd_loss(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    temperature=1.0,
    alpha=0.5,
    divergence="forward_kl",
    beta=0.5,
    ignore_index=-100,
    reduction="batchmean",
    student_features=None,
    teacher_features=None,
    feature_weight=0.0,
):
    opts = dict(
        temperature=temperature,
        alpha=alpha,
        divergence=divergence,
        beta=beta,
        ignore_index=ignore_index,
        reduction=reduction,
        feature_weight=feature_weight,
    )
    s, t, lab, feats = validate(
        student_logits,
        teacher_logits,
        labels,
        student_features=student_features,
        teacher_features=teacher_features,
        **opts,
    )
    fs, ft = feats if feats is not None else (None, None)
    grad_on = torch.is_grad_enabled()
    want_grad_s = grad_on and student_logits.requires_grad
    want_grad_f = grad_on and fs is not None and fs.requires_grad
    ft = None if ft is None else ft.detach()
    return _KdLossReference.apply(s, t.detach(), lab, fs, ft, opts, want_grad_s, want_grad_f)


kd_loss.__doc__ = KD_LOSS_DOC
