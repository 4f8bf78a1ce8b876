"""The @triton.jit kernels of kd_loss: one program per row (logit rows, then feature rows), the gradient written
in the forward pass. kernels/kd_loss_triton.py launches them; the math and the bytes moved are below.

Math (per row of V logits; s = student, t = teacher, T = temperature; the contract is KD_LOSS_DOC)
    zs = s / T, zt = t / T        ls = log_softmax(zs), lt = log_softmax(zt), l1 = log_softmax(s)   (T = 1 for CE)
    loss = alpha * T^2 * D + (1 - alpha) * (-l1[label])
    d loss / d s = alpha * T * dD/dzs + (1 - alpha) * (exp(l1) - onehot(label))
    forward_kl  D = sum pt (lt - ls)                 dD/dzs = ps - pt
    reverse_kl  D = sum ps (ls - lt)                 dD/dzs = ps (ls - lt - D)
    jsd         D = b KL(pt || m) + (1-b) KL(ps || m),  m = b pt + (1-b) ps
                                                     dD/dzs = (1-b) ps (ls - log m - KL(ps || m))
A term p * x with p = 0 is taken as 0, so -inf logits (masked vocab) never make 0 * -inf = NaN.

Bytes (b per logit): rows of V <= MAX_FUSED_V sit in registers, read once: 3b N V, the minimum. Longer rows take
an online-softmax pass over tiles, then a gradient pass: 5b N V (jsd: one more read pass, 7b N V). Ignored rows
write zeros only. Offsets are int64 (program_id(0).to(tl.int64)); loads are cast to fp32 at once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kdbench.kernels.kd_features import feature_row

_NEG_BIG = tl.constexpr(-3.0e38)  # running-max floor: finite, so exp(m_old - m_new) is never exp(-inf + inf) = NaN


@triton.jit
def _mass_times(p, x):
    """p * x, but 0 where p == 0 (x may then be +-inf or NaN)."""
    return tl.where(p > 0, p * x, 0.0)


@triton.jit
def _nan_unless_finite(loss, lse_t):
    """loss, but NaN where the teacher's log-sum-exp is not finite: NaN or +inf in the row, or nothing but -inf.
    Such a row's soft term would otherwise drop out (every p_t is NaN, and NaN > 0 is false) over NaN gradients."""
    return tl.where(tl.abs(lse_t) < float("inf"), loss, float("nan"))


@triton.jit
def _softmax_row(z):
    """(log-sum-exp, log-softmax, softmax) of a whole row z in registers (-inf outside the row)."""
    m = tl.max(z, 0)
    e = tl.exp(z - m)
    d = tl.sum(e, 0)
    lse = m + tl.log(d)
    return lse, z - lse, e / d


@triton.jit
def _load_tile(row_ptr, offs, stride, V):
    """One tile of a row as fp32, -inf outside the row."""
    return tl.load(row_ptr + offs * stride, mask=offs < V, other=float("-inf")).to(tl.float32)


@triton.jit
def _online_update(m, d, z):
    """Fold tile z into a running max m and sum d = sum exp(z - m). Returns (m, d, rescale, exp(z - m))."""
    m_new = tl.maximum(m, tl.max(z, 0))
    rescale = tl.exp(m - m_new)
    e = tl.exp(z - m_new)
    return m_new, d * rescale + tl.sum(e, 0), rescale, e


@triton.jit
def _log_mixture(lt, ls, log_beta, log_1m_beta):
    """log(beta * pt + (1 - beta) * ps) from log-probs, as a logaddexp that survives both being -inf."""
    a = lt + log_beta
    b = ls + log_1m_beta
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return tl.where(hi == float("-inf"), float("-inf"), hi + tl.log(1.0 + tl.exp(lo - hi)))


@triton.jit
def _soft_grad(ls, lt, ps, pt, D, kl_sm, beta, log_beta, log_1m_beta, DIVERGENCE: tl.constexpr):
    """dD/dzs for one tile (see the top comment)."""
    if DIVERGENCE == 0:
        g = ps - pt
    elif DIVERGENCE == 1:
        g = _mass_times(ps, ls - lt - D)
    else:
        lm = _log_mixture(lt, ls, log_beta, log_1m_beta)
        g = (1.0 - beta) * _mass_times(ps, ls - lm - kl_sm)
    return g


@triton.jit
def _kd_loss_fwd_kernel(
    s_ptr, s_stride_r, s_stride_v,
    t_ptr, t_stride_r, t_stride_v,
    lab_ptr,  # (N,) int labels; unused when HAS_LABELS is False
    grad_ptr,  # (N, V) contiguous, student dtype; unused when WRITE_GRAD is False
    loss_ptr,  # (N,) fp32 unreduced row losses
    scale_ptr,  # (1,) fp32 gradient scale: 1 / n_valid for batchmean, else 1
    V, inv_T, T, alpha, beta, log_beta, log_1m_beta, ignore_index,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    DO_SOFT: tl.constexpr,  # alpha != 0
    DO_CE: tl.constexpr,  # alpha != 1 and labels given
    SAME_T: tl.constexpr,  # T == 1: the CE softmax is the soft one
    WRITE_GRAD: tl.constexpr,
    SINGLE: tl.constexpr,  # BLOCK_V >= V: the whole row in registers
    BLOCK_V: tl.constexpr,
    # The feature MSE, in the same launch: programs N .. N + M - 1 take its M rows (feature_row).
    fs_ptr=None, fs_stride_r=0, fs_stride_h=0, ft_ptr=None, ft_stride_r=0, ft_stride_h=0, fgrad_ptr=None,
    sq_ptr=None, N=0, H=0, f_coef=0.0,
    HAS_FEATURES: tl.constexpr = False,
    WRITE_FGRAD: tl.constexpr = False,
    BLOCK_H: tl.constexpr = 16,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_FEATURES and row >= N:
        feature_row(row - N, fs_ptr, fs_stride_r, fs_stride_h, ft_ptr, ft_stride_r, ft_stride_h, fgrad_ptr, sq_ptr,
                    H, f_coef, WRITE_FGRAD, BLOCK_H)
        return
    s_row = s_ptr + row * s_stride_r
    t_row = t_ptr + row * t_stride_r
    g_row = grad_ptr + row * V

    valid = True
    lab = 0
    if HAS_LABELS:
        lab = tl.load(lab_ptr + row).to(tl.int64)
        valid = lab != ignore_index

    if valid:
        scale = tl.load(scale_ptr)
        row_loss = 0.0
        if SINGLE:
            # ---- the whole row in registers: read once, exact (non-online) formulas ----
            offs = tl.arange(0, BLOCK_V)
            mask = offs < V
            s = tl.load(s_row + offs * s_stride_v, mask=mask, other=float("-inf")).to(tl.float32)
            g = tl.zeros([BLOCK_V], dtype=tl.float32)
            ps = g
            lse_s = 0.0
            if DO_SOFT:
                t = tl.load(t_row + offs * t_stride_v, mask=mask, other=float("-inf")).to(tl.float32)
                zs = s * inv_T
                zt = t * inv_T
                lse_s, ls, ps = _softmax_row(zs)
                lse_t, lt, pt = _softmax_row(zt)
                kl_sm = 0.0
                if DIVERGENCE == 0:
                    D = tl.sum(_mass_times(pt, lt - ls), 0)
                elif DIVERGENCE == 1:
                    D = tl.sum(_mass_times(ps, ls - lt), 0)
                else:
                    lm = _log_mixture(lt, ls, log_beta, log_1m_beta)
                    kl_sm = tl.sum(_mass_times(ps, ls - lm), 0)
                    D = beta * tl.sum(_mass_times(pt, lt - lm), 0) + (1.0 - beta) * kl_sm
                row_loss = _nan_unless_finite(row_loss + alpha * T * T * D, lse_t)
                if WRITE_GRAD:
                    g += (alpha * T) * _soft_grad(ls, lt, ps, pt, D, kl_sm, beta, log_beta, log_1m_beta, DIVERGENCE)
            if DO_CE:
                if SAME_T and DO_SOFT:
                    lse_1 = lse_s
                    q = ps
                else:
                    lse_1, _, q = _softmax_row(s)
                in_range = (lab >= 0) & (lab < V)
                s_lab = tl.load(s_row + lab * s_stride_v, mask=in_range, other=0.0).to(tl.float32)
                row_loss += (1.0 - alpha) * (lse_1 - s_lab)
                if WRITE_GRAD:
                    g += (1.0 - alpha) * (q - tl.where(offs == lab, 1.0, 0.0))
            if WRITE_GRAD:
                tl.store(g_row + offs, (g * scale).to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            # ---- pass 1: online softmax over tiles; for forward/reverse KL also a running sum for D ----
            m_s = tl.full([], _NEG_BIG, tl.float32)
            d_s = tl.zeros([], tl.float32)
            m_t = tl.full([], _NEG_BIG, tl.float32)
            d_t = tl.zeros([], tl.float32)
            m_1 = tl.full([], _NEG_BIG, tl.float32)
            d_1 = tl.zeros([], tl.float32)
            acc = tl.zeros([], tl.float32)  # sum exp(z - m) (zt - zs) with z = zt (forward) or zs (reverse)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                s = _load_tile(s_row, offs, s_stride_v, V)
                if DO_SOFT:
                    t = _load_tile(t_row, offs, t_stride_v, V)
                    zs = s * inv_T
                    zt = t * inv_T
                    m_s, d_s, r_s, e_s = _online_update(m_s, d_s, zs)
                    m_t, d_t, r_t, e_t = _online_update(m_t, d_t, zt)
                    if DIVERGENCE == 0:
                        acc = acc * r_t + tl.sum(_mass_times(e_t, zt - zs), 0)
                    elif DIVERGENCE == 1:
                        acc = acc * r_s + tl.sum(_mass_times(e_s, zs - zt), 0)
                if DO_CE and not (SAME_T and DO_SOFT):
                    m_1, d_1, r_1, e_1 = _online_update(m_1, d_1, s)
            lse_s = m_s + tl.log(d_s)
            lse_t = m_t + tl.log(d_t)
            lse_1 = m_1 + tl.log(d_1)
            if SAME_T and DO_SOFT:
                lse_1 = lse_s

            kl_sm = 0.0
            D = 0.0
            if DO_SOFT:
                if DIVERGENCE == 0:
                    D = acc / d_t - lse_t + lse_s
                elif DIVERGENCE == 1:
                    D = acc / d_s - lse_s + lse_t
                else:
                    # ---- jsd: an extra read pass, since log m needs the finished log-sum-exps ----
                    kl_tm = tl.zeros([], tl.float32)
                    kl_sm = tl.zeros([], tl.float32)
                    for start in range(0, V, BLOCK_V):
                        offs = start + tl.arange(0, BLOCK_V)
                        s = _load_tile(s_row, offs, s_stride_v, V)
                        t = _load_tile(t_row, offs, t_stride_v, V)
                        ls = s * inv_T - lse_s
                        lt = t * inv_T - lse_t
                        lm = _log_mixture(lt, ls, log_beta, log_1m_beta)
                        kl_tm += tl.sum(_mass_times(tl.exp(lt), lt - lm), 0)
                        kl_sm += tl.sum(_mass_times(tl.exp(ls), ls - lm), 0)
                    D = beta * kl_tm + (1.0 - beta) * kl_sm
                row_loss = _nan_unless_finite(row_loss + alpha * T * T * D, lse_t)
            if DO_CE:
                in_range = (lab >= 0) & (lab < V)
                s_lab = tl.load(s_row + lab * s_stride_v, mask=in_range, other=0.0).to(tl.float32)
                row_loss += (1.0 - alpha) * (lse_1 - s_lab)

            # ---- pass 2: the gradient, from the row statistics ----
            if WRITE_GRAD:
                for start in range(0, V, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    s = _load_tile(s_row, offs, s_stride_v, V)
                    mask = offs < V
                    g = tl.zeros([BLOCK_V], dtype=tl.float32)
                    ps = g
                    if DO_SOFT:
                        t = _load_tile(t_row, offs, t_stride_v, V)
                        ls = s * inv_T - lse_s
                        lt = t * inv_T - lse_t
                        ps = tl.exp(ls)
                        pt = tl.exp(lt)
                        g += (alpha * T) * _soft_grad(ls, lt, ps, pt, D, kl_sm, beta, log_beta, log_1m_beta, DIVERGENCE)
                    if DO_CE:
                        if SAME_T and DO_SOFT:
                            q = ps
                        else:
                            q = tl.exp(s - lse_1)
                        g += (1.0 - alpha) * (q - tl.where(offs == lab, 1.0, 0.0))
                    tl.store(g_row + offs, (g * scale).to(grad_ptr.dtype.element_ty), mask=mask)
        tl.store(loss_ptr + row, row_loss)
    else:
        # An ignored row: read nothing, write zeros.
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                tl.store(g_row + offs, tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def _scale_rows_kernel(g_ptr, go_ptr, go_stride, n_cols, BLOCK: tl.constexpr):
    """g[row, :] *= go[row * go_stride] in place (go_stride = 0 for a scalar grad_output), in fp32."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    go = tl.load(go_ptr + row * go_stride).to(tl.float32)
    g = tl.load(g_ptr + row * n_cols + offs, mask=mask).to(tl.float32)
    tl.store(g_ptr + row * n_cols + offs, (g * go).to(g_ptr.dtype.element_ty), mask=mask)
