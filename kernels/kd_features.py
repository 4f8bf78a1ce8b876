"""kd_loss's feature term on the Triton path: feature_weight * mean (fs - ft)^2 over (M, H) features (KD_LOSS_DOC).

Every Triton kernel (kd_loss_jit.py's, kd_loss_split.py's, kd_loss_persistent.py's) computes it in the launch of
the logit rows, one program per feature row: `feature_row` (@triton.jit) is that row, `feature_args` its kernel
arguments and `feature_term` the term and its gradient from the rows' sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def feature_row(row, fs_ptr, fs_stride_r, fs_stride_h, ft_ptr, ft_stride_r, ft_stride_h, fgrad_ptr, sq_ptr, H,
                f_coef, WRITE_FGRAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """One row (an int64 scalar) of the feature MSE: sum_h (fs - ft)^2 into sq_ptr[row] (fp32), and its gradient
    f_coef (fs - ft) into the contiguous (M, H) fgrad_ptr, in the student features' dtype."""
    acc = tl.zeros([], tl.float32)
    for start in range(0, H, BLOCK_H):
        offs = start + tl.arange(0, BLOCK_H)
        mask = offs < H
        a = tl.load(fs_ptr + row * fs_stride_r + offs * fs_stride_h, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(ft_ptr + row * ft_stride_r + offs * ft_stride_h, mask=mask, other=0.0).to(tl.float32)
        diff = a - b
        acc += tl.sum(diff * diff, 0)
        if WRITE_FGRAD:
            tl.store(fgrad_ptr + row * H + offs, (f_coef * diff).to(fgrad_ptr.dtype.element_ty), mask=mask)
    tl.store(sq_ptr + row, acc)


def feature_args(features, opts, want_grad: bool, max_block: int) -> dict:
    """The feature term's kernel arguments for features = (fs, ft) (M, H); empty without features. The outputs
    are allocated here: sq_ptr (M,) fp32 sums, fgrad_ptr the gradient when WRITE_FGRAD (else sq_ptr again). Tiles
    of at most max_block columns."""
    if features is None:
        return {}
    fs, ft = features
    m, h = fs.shape
    sq = torch.empty(m, dtype=torch.float32, device=fs.device)
    fgrad = torch.empty((m, h), dtype=fs.dtype, device=fs.device) if want_grad else sq
    denom = h if opts["reduction"] == "none" else m * h
    return dict(fs_ptr=fs, fs_stride_r=fs.stride(0), fs_stride_h=fs.stride(1), ft_ptr=ft, ft_stride_r=ft.stride(0),
                ft_stride_h=ft.stride(1), fgrad_ptr=fgrad, sq_ptr=sq, M=m, H=h,
                f_coef=2.0 * float(opts["feature_weight"]) / max(denom, 1), HAS_FEATURES=True,
                WRITE_FGRAD=want_grad, BLOCK_H=min(triton.next_power_of_2(h), max_block))


def no_features(placeholder: torch.Tensor) -> dict:
    """feature_args' keys for a launch without features, every pointer `placeholder` (never read or written)."""
    return dict(fs_ptr=placeholder, fs_stride_r=0, fs_stride_h=0, ft_ptr=placeholder, ft_stride_r=0, ft_stride_h=0,
                fgrad_ptr=placeholder, sq_ptr=placeholder, M=0, H=0, f_coef=0.0, HAS_FEATURES=False,
                WRITE_FGRAD=False, BLOCK_H=16)


def feature_term(fargs: dict, opts, features):
    """(the feature term: (M,) for 'none', else a scalar; its gradient (M, H) or None), or None without features."""
    if features is None:
        return None
    m, h = features[0].shape
    weight = float(opts["feature_weight"])
    sq = fargs["sq_ptr"]
    term = sq * (weight / h) if opts["reduction"] == "none" else sq.sum() * (weight / max(m * h, 1))
    return term, (fargs["fgrad_ptr"] if fargs["WRITE_FGRAD"] else None)
