"""The torch backend of kd_loss: an exact, chunked PyTorch reference, the CPU path and the kernels' test oracle.

It runs on any device (KDBENCH_KERNEL=torch on CUDA tensors gives an A/B check of the kernel). Like the Triton
kernel it computes the gradient w.r.t. the student logits analytically in the forward pass, chunk by chunk over the
rows, so it never holds more than a few (chunk, V) fp32 temporaries, whatever N.
"""

from __future__ import annotations

import math

import torch

# validate and the contract are the front's; they are named here too for the callers of the reference.
from kdbench.kernels.front import KD_LOSS_DOC, KdLossInputError, front_with_backend, validate  # noqa: F401

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
        # A teacher row with NaN or +inf, or only -inf, has no finite log-prob: NaN, where D alone would drop the
        # NaN entries (the front refuses such rows on CPU; this is the CUDA path, as the kernels do it).
        d = torch.where(torch.isfinite(lt).any(-1), d, math.nan)
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


def scale_rows_(grad: torch.Tensor, go: torch.Tensor) -> None:
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


def kd_loss_forward(s, t, labels, opts, want_grad: bool, features=None, want_grad_f: bool = False):
    """The backend's forward on s, t (N, V) and features = (fs, ft) (M, H) or None (kernels/front.py): row losses
    (N,), the gradient scaled for the reduction (or None), the batchmean scale, and the feature part or None."""
    n, v = s.shape
    cdt = torch.promote_types(s.dtype, torch.float32)
    rows = torch.zeros(n, dtype=cdt, device=s.device)
    grad = torch.empty((n, v), dtype=s.dtype, device=s.device) if want_grad else None
    n_valid = 0
    step = max(1, _CHUNK_ELEMS // v)
    for i in range(0, n, step):
        lab = labels[i : i + step] if labels is not None else None
        loss_c, grad_c, valid_c = _rows_forward(
            s[i : i + step].to(cdt),
            t[i : i + step].to(cdt),
            lab,
            want_grad=want_grad,
            **{k: opts[k] for k in ("temperature", "alpha", "divergence", "beta", "ignore_index")},
        )
        rows[i : i + step] = loss_c
        if want_grad:
            grad[i : i + step] = grad_c
        n_valid += int(valid_c.sum())

    scale = 1.0 / max(n_valid, 1) if opts["reduction"] == "batchmean" else 1.0
    if want_grad and opts["reduction"] != "none" and scale != 1.0:
        scale_rows_(grad, torch.tensor(scale, dtype=cdt, device=grad.device))
    feature_part = None
    if features is not None:
        term, grad_f = _feature_forward(*features, opts["feature_weight"], opts["reduction"], want_grad_f)
        feature_part = (term.to(cdt), grad_f)
    return rows, grad, scale, feature_part


kd_loss = front_with_backend("torch")  # kd_loss with this backend whatever the device (its signature and doc)
