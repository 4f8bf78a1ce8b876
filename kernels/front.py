"""The kd_loss front, written once: the loss contract (KD_LOSS_DOC), validation, the choice of backend, and the one
autograd.Function that every backend's forward runs under.

A backend is a module with `kd_loss_forward(s, t, labels, opts, want_grad, features, want_grad_f)` -> (row losses
(N,); the gradient (N, V) already scaled for the reduction, or None; the batchmean scale, a number or 0-d tensor;
the feature part or None) and `scale_rows_(grad, go)`, and optionally `check_inputs(s, t, features)`. BACKENDS names them by module path, so that
importing this module imports no backend (nor triton): kernels/reference.py (torch, any device) and
kernels/kd_loss_triton.py (triton); kernels/kd_loss_split.py and kd_loss_persistent.py (triton, untimed, opt-in:
KDBENCH_KERNEL=split|persistent, or KDBENCH_KERNEL_VARIANT=split|persistent|new for what 'triton' means). The
environment variable KDBENCH_KERNEL picks one:
    KDBENCH_KERNEL=torch    always the reference (any device: an A/B check of the kernel on a GPU)
    KDBENCH_KERNEL=triton   always the Triton kernel; on CPU tensors this needs TRITON_INTERPRET=1 (how CI tests it)
    unset / auto            triton for fp32/bf16/fp16 CUDA tensors, torch otherwise
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import os

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
Non-finite teacher logits: in a valid row, NaN, +inf, or a row that is entirely -inf raise KdLossInputError for
CPU tensors (reference path, and Triton under the interpreter). On CUDA they are not checked (a host sync every
step): there every backend (each Triton kernel, and the reference) makes such a row's loss NaN, at no extra pass
(its teacher log-sum-exp is not finite), so "none" holds NaN in that row and "batchmean" and "sum" are NaN, and
the trainer's NaN check stops the run: never a finite loss over NaN gradients. At alpha = 0 the teacher is not
read. fused_linear_kd_loss and top_k_kd_loss (teacher_top_k's log-probs of such a row are NaN) do the same.
NaN in the student's logits gives a NaN loss.
Errors (KdLossInputError, a ValueError and a KdbenchError, one line): inputs that are not tensors, teacher vocab
larger than the student's (slicing teacher_logits[..., :V] is the caller's choice), other shape mismatches, labels
of the wrong shape or out of range and non-finite teacher rows (both checked on CPU only: the CUDA kernel skips
checks that need a device sync), an unknown divergence or reduction, temperature <= 0 or not finite, beta outside
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

    if t2d.device.type == "cpu" and n > 0:  # as the label range: on CUDA it would cost a host sync every step
        _check_teacher_rows(t2d, labels, ignore_index)

    feats = None
    if feature_weight != 0.0:
        if student_features is None or teacher_features is None:
            raise KdLossInputError("kd_loss: feature_weight != 0 needs both student_features and teacher_features")
        if not isinstance(student_features, torch.Tensor) or not isinstance(teacher_features, torch.Tensor):
            raise KdLossInputError("kd_loss: student_features and teacher_features must be tensors")
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


def _check_teacher_rows(t, labels, ignore_index) -> None:
    """Each valid row of teacher_logits t (N, V) is finite or -inf, with at least one finite entry. NaN or +inf
    would otherwise give a finite loss over NaN gradients (their row's soft term silently lost)."""
    valid = torch.ones(t.shape[0], dtype=torch.bool) if labels is None else labels != ignore_index
    bad = (torch.isnan(t) | torch.isposinf(t)).any(-1) & valid
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        what = "NaN" if bool(torch.isnan(t[row]).any()) else "+inf"
        raise KdLossInputError(f"kd_loss: teacher_logits row {row} holds {what}; only -inf (probability 0) may "
                               "stand in for a logit")
    empty = torch.isneginf(t).all(-1) & valid
    if bool(empty.any()):
        raise KdLossInputError(f"kd_loss: teacher_logits row {int(empty.nonzero()[0])} is entirely -inf: it has no "
                               "probability mass")


# ----------------------------------------------------------------------------------------------------------------
# Backends and dispatch
# ----------------------------------------------------------------------------------------------------------------

# name -> module (imported on first use). A new kernel is one more entry here and a module with the interface above.
BACKENDS = {"triton": "kdbench.kernels.kd_loss_triton", "torch": "kdbench.kernels.reference",
            # issue 18's kernels, UNTIMED and opt-in (kernels/TUNING.md): KDBENCH_KERNEL=split or persistent, or
            # KDBENCH_KERNEL_VARIANT below
            "split": "kdbench.kernels.kd_loss_split", "persistent": "kdbench.kernels.kd_loss_persistent"}
_CHOICES = ("auto", *BACKENDS)
# KDBENCH_KERNEL_VARIANT: which Triton kernel 'triton' (chosen or auto) means. auto (unset): the committed one;
# split: the split-row kernel; persistent: the persistent kernel where rows fit it, the committed one elsewhere;
# new: persistent where rows fit, split elsewhere.
_VARIANTS = ("auto", "split", "persistent", "new")
_PERSISTENT_MAX_V = 8192  # kernels/kd_loss_persistent.py's MAX_V (not imported: the front imports no kernel)


def backend_for(student_logits) -> str:
    """The implementation kd_loss uses for these logits under KDBENCH_KERNEL and KDBENCH_KERNEL_VARIANT."""
    choice = os.environ.get("KDBENCH_KERNEL", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise KdLossInputError(f"KDBENCH_KERNEL={choice!r} is not one of: {', '.join(_CHOICES)}")
    if choice == "auto":
        supported = student_logits.dtype in (torch.float32, torch.bfloat16, torch.float16)
        choice = "triton" if student_logits.is_cuda and supported else "torch"
    return _triton_variant(student_logits) if choice == "triton" else choice


def _triton_variant(student_logits) -> str:
    variant = os.environ.get("KDBENCH_KERNEL_VARIANT", "auto").strip().lower() or "auto"
    if variant not in _VARIANTS:
        raise KdLossInputError(f"KDBENCH_KERNEL_VARIANT={variant!r} is not one of: {', '.join(_VARIANTS)}")
    fits = 1 << max(student_logits.shape[-1] - 1, 0).bit_length() <= _PERSISTENT_MAX_V
    if variant in ("persistent", "new") and fits:
        return "persistent"
    return "split" if variant == "split" or variant == "new" else "triton"


def reduce_rows(rows, scale, feature_part, reduction: str):
    """A backend forward's outputs as kd_loss's result: (the loss, the feature gradient or None)."""
    loss = rows if reduction == "none" else (rows.sum() if reduction == "sum" else rows.sum() * scale)
    if feature_part is None:
        return loss, None
    term, grad_f = feature_part
    return loss + term, grad_f


class KdLossFunction(torch.autograd.Function):
    """Runs a backend's forward, which computes the loss and its gradient at once; backward scales the saved
    gradient by grad_output, in place (nothing at all when grad_output == 1, the usual loss.backward())."""

    @staticmethod
    def forward(ctx, backend, s, t, labels, fs, ft, opts, want_grad_s, want_grad_f):
        features = (fs, ft) if fs is not None else None
        rows, grad, scale, feature_part = backend.kd_loss_forward(s, t, labels, opts, want_grad_s, features,
                                                                  want_grad_f)
        loss, grad_f = reduce_rows(rows, scale, feature_part, opts["reduction"])
        ctx.backend = backend
        ctx.reduction = opts["reduction"]
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
        # One host sync to skip a full read+write of the gradient in the common loss.backward() case.
        if ctx.reduction != "none" and bool(go == 1):
            return None, grad, None, None, grad_f, None, None, None, None
        ctx.scaled = True
        for g in (grad, grad_f):
            if g is not None:
                ctx.backend.scale_rows_(g, go)
        return None, grad, None, None, grad_f, None, None, None, None


def _run(backend: str | None, student_logits, teacher_logits, labels, **kwargs):
    s, t, lab, feats, opts = validate_call(student_logits, teacher_logits, labels, **kwargs)
    module = importlib.import_module(BACKENDS[backend or backend_for(student_logits)])
    if hasattr(module, "check_inputs"):
        module.check_inputs(s, t, feats)
    fs, ft = feats if feats is not None else (None, None)
    grad_on = torch.is_grad_enabled()
    want_grad_s = grad_on and student_logits.requires_grad
    want_grad_f = grad_on and fs is not None and fs.requires_grad
    ft = None if ft is None else ft.detach()
    return KdLossFunction.apply(module, s, t.detach(), lab, fs, ft, opts, want_grad_s, want_grad_f)


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
    return _run(None, student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
                divergence=divergence, beta=beta, ignore_index=ignore_index, reduction=reduction,
                student_features=student_features, teacher_features=teacher_features,
                feature_weight=feature_weight)


kd_loss.__doc__ = KD_LOSS_DOC
_SIGNATURE = inspect.signature(kd_loss)
# The loss options and their defaults, from kd_loss's signature (the one place they are written).
DEFAULTS = {name: p.default for name, p in _SIGNATURE.parameters.items()
            if p.kind is p.KEYWORD_ONLY and name not in ("student_features", "teacher_features")}


def validate_call(student_logits, teacher_logits, labels=None, **kwargs):
    """validate() with kd_loss's defaults filled in; returns (s, t, labels, features, opts: the option dict)."""
    unknown = set(kwargs) - set(_SIGNATURE.parameters)
    if unknown:
        raise KdLossInputError(f"kd_loss: unknown argument(s) {', '.join(sorted(unknown))}")
    opts = {**DEFAULTS, **{k: v for k, v in kwargs.items() if k in DEFAULTS}}
    s, t, lab, feats = validate(student_logits, teacher_logits, labels, student_features=kwargs.get(
        "student_features"), teacher_features=kwargs.get("teacher_features"), **opts)
    return s, t, lab, feats, opts


def front_with_backend(backend: str):
    """kd_loss with `backend` whatever the device and KDBENCH_KERNEL: each backend module's own `kd_loss`."""

    @functools.wraps(kd_loss)
    def fixed(*args, **kwargs):
        bound = _SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
        return _run(backend, args.pop("student_logits"), args.pop("teacher_logits"), args.pop("labels"), **args)

    return fixed
