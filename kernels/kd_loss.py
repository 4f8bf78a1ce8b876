"""Fused knowledge-distillation loss: soft-target divergence + hard-label CE + feature MSE, in Triton.

Math (per row of V logits; s = student, t = teacher, T = temperature, see KD_LOSS_DOC for the full contract)
------------------------------------------------------------------------------------------------------------
    zs = s / T, zt = t / T        ls = log_softmax(zs), lt = log_softmax(zt), l1 = log_softmax(s)   (T = 1 for CE)
    ps = exp(ls), pt = exp(lt)
    loss = alpha * T^2 * D + (1 - alpha) * (-l1[label])
    d loss / d s = alpha * T * dD/dzs + (1 - alpha) * (exp(l1) - onehot(label))        (the 1/T of dzs/ds
                                                                                        eats one T of T^2)
    forward_kl  D = sum pt (lt - ls)                 dD/dzs = ps - pt
    reverse_kl  D = sum ps (ls - lt)                 dD/dzs = ps (ls - lt - D)
    jsd         D = b KL(pt || m) + (1-b) KL(ps || m),  m = b pt + (1-b) ps
                                                     dD/dzs = (1-b) ps (ls - log m - KL(ps || m))
A term p * x with p = 0 is taken as 0, so -inf logits (masked vocab) never make 0 * -inf = NaN.

The gradient needs only row statistics (log-sum-exps, and D for reverse KL / KL(ps || m) for JSD), so it is
computed in the forward pass and written once, in the student logits' dtype. Backward scales it by grad_output in
place (nothing at all when grad_output == 1, the usual `loss.backward()`).

Bytes moved (b = bytes per logit; N x V logits; minimal = read s and t once, write the gradient once = 3b N V)
------------------------------------------------------------------------------------------------------------
    V <= MAX_FUSED_V (8192): the whole row sits in registers, read once: 3b N V, the minimum.
    larger V, forward/reverse KL: pass 1 = online softmax over tiles (running max and sum for zs, zt and s,
        plus a running, rescaled sum for D); pass 2 re-reads s and t and writes the gradient: 5b N V.
    larger V, jsd: KL(ps || m) needs the finished log-sum-exps, hence one more read pass: 7b N V.
    Rows whose label is ignore_index read nothing and write zeros: b V each.
    Eager PyTorch (log_softmax x3, kl_div, cross_entropy, autograd) moves roughly 10-20 fp32 N x V tensors.
Extra memory: the gradient (N x V, student dtype) plus O(N) fp32 row losses. No N x V fp32 temporaries.
The feature MSE runs in the same launch: after the N logit rows, programs N .. N + M - 1 each take one of its M
rows of H (read 2 M H, write M H); without features that branch is compiled out.

Layout: rows on grid axis 0 with int64 offsets (N * V > 2^31 is fine); row and column strides are passed, so
non-contiguous (N, V) views need no copy ((B, L, V) inputs are flattened with reshape, which copies only when the
leading dims cannot be merged). Loads are cast to fp32 at once; all accumulation is fp32.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from kdbench.kernels.reference import KD_LOSS_DOC, KdLossInputError, validate

# At T = 2 or 4 the CE softmax (T = 1) can come from the soft one: exp(s - T m) = exp(s/T - m) ** T, which saves one
# exp per logit in each pass and the tiled path's running max of s. Off until timed against the default on a GPU
# (kdbench bench kernels has a row for it); the tests cover both.
CE_FROM_SOFT = False
# Tiled path: each read pass walks the row's tiles the other way from the pass before (pass 2 starts at the tiles
# pass 1 read last, the likeliest still in L2), with L2 hints: an earlier pass's loads are kept (evict_last), the
# last pass's loads and the gradient stores go first (evict_first). Off until timed against the default on a GPU.
L2_ORDER = False
# Tiled path, pass 1: tiles as [BLOCK_V // SLOT, SLOT] with SLOT one warp's width of vector loads, so that each
# per-tile max and sum stays inside a warp instead of crossing warps through shared memory with a barrier (7 per
# tile); statistics per slot, merged once per row. Off until timed.
WARP_TILES = False
# Tiled path, rows whose starts are not 16-byte aligned (GPT-2's V = 50257, BERT's 30522), where the loads are one
# element per instruction: load from the row's start rounded down to 16 bytes instead, in whole vectors, and set
# the neighbouring rows' elements to -inf. The gradient stores stay unaligned. Off until timed. It reads up to 15
# bytes past the tensor's last row, inside its last 16-byte block: CUDA allocations are 512-byte granular.
ALIGNED_LOADS = False
# Tell the compiler how many elements every row start (and V) is a multiple of, up to one 16-byte vector. Triton
# learns that itself only for integers divisible by 16, so rows of V = 1000 (or BERT's 30522) are read and written
# one element per instruction; with the hint, 16 bytes per instruction where the strides allow. Off until timed.
ROW_ALIGN_HINTS = False
# Rows with next_pow2(V) <= MAX_FUSED_V take the single-read path; tests lower it to exercise the tiled path.
MAX_FUSED_V = 8192
# Tile width under the Triton interpreter (CPU), where autotuning is off.
INTERPRET_BLOCK_V = 2048

_FORWARD_KL, _REVERSE_KL, _JSD = 0, 1, 2
_DIVERGENCE_CODE = {"forward_kl": _FORWARD_KL, "reverse_kl": _REVERSE_KL, "jsd": _JSD}
_NEG_BIG = tl.constexpr(-3.0e38)  # running-max floor: finite, so exp(m_old - m_new) is never exp(-inf + inf) = NaN


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _mass_times(p, x):
    """p * x, but 0 where p == 0 (x may then be +-inf or NaN)."""
    return tl.where(p > 0, p * x, 0.0)


@triton.jit
def _ipow(x, N: tl.constexpr):
    """x ** N for a small constexpr integer N >= 1, by multiplication."""
    y = x
    for _ in tl.static_range(N - 1):
        y = y * x
    return y


@triton.jit
def _load_tile(row_ptr, offs, stride, V, lead, KEEP: tl.constexpr, DROP: tl.constexpr, ALIGN: tl.constexpr):
    """One tile of a row as fp32, -inf outside the row, with an L2 eviction hint: KEEP (evict_last) for a pass
    that is read again, DROP (evict_first) for the last one; neither is the hardware default.

    offs are memory offsets from row_ptr. With ALIGN (ALIGNED_LOADS), row_ptr is the row's start rounded down to
    ALIGN elements (16 bytes) and column c sits at offset c + lead: the load mask covers whole vectors, so that
    the compiler can issue 16-byte loads, and the neighbouring rows' elements they bring are set to -inf after."""
    if ALIGN > 0:
        first = offs // ALIGN * ALIGN
        mask = (first + ALIGN > lead) & (first < V + lead)
    else:
        mask = offs < V
    if KEEP:
        x = tl.load(row_ptr + offs * stride, mask=mask, other=float("-inf"), eviction_policy="evict_last")
    elif DROP:
        x = tl.load(row_ptr + offs * stride, mask=mask, other=float("-inf"), eviction_policy="evict_first")
    else:
        x = tl.load(row_ptr + offs * stride, mask=mask, other=float("-inf"))
    x = x.to(tl.float32)
    if ALIGN > 0:
        col = offs - lead
        x = tl.where((col >= 0) & (col < V), x, float("-inf"))
    return x


@triton.jit
def _tile_offsets(start, last_start, BACKWARD: tl.constexpr, BLOCK_V: tl.constexpr):
    """Offsets of the tile at loop position `start`: from the row's end when BACKWARD (the loop itself always runs
    forward, `range(0, V + lead, BLOCK_V)`; last_start is the last tile's start)."""
    if BACKWARD:
        return (last_start - start) + tl.arange(0, BLOCK_V)
    else:
        return start + tl.arange(0, BLOCK_V)


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
def _slot_update(m, d, z):
    """_online_update for a [R, K] tile whose rows are slots: running max m and sum d per slot ([R]), each
    reduction within one warp."""
    m_new = tl.maximum(m, tl.max(z, 1))
    rescale = tl.exp(m - m_new)
    e = tl.exp(z - m_new[:, None])
    return m_new, d * rescale + tl.sum(e, 1), rescale, e


@triton.jit
def _merge_slots(m, d):
    """(max, sum of exp(. - max)) of a row from its slots' running (m, d)."""
    m_all = tl.max(m, 0)
    return m_all, tl.sum(d * tl.exp(m - m_all), 0)


@triton.jit
def _pass1_slots(s_row, s_stride_v, t_row, t_stride_v, V, lead, inv_T, DIVERGENCE: tl.constexpr,
                 DO_SOFT: tl.constexpr, DO_CE: tl.constexpr, SAME_T: tl.constexpr, T_POW: tl.constexpr,
                 KEEP: tl.constexpr, ALIGN: tl.constexpr, BLOCK_V: tl.constexpr, SLOT: tl.constexpr):
    """Pass 1 of the tiled path with each tile as [BLOCK_V // SLOT, SLOT]: SLOT is one warp's width of vector
    loads (32 lanes x 16 bytes), so Triton gives each row of the tile to one warp and every per-tile reduction
    stays inside a warp (shuffles, no barrier). Running statistics are kept per slot and merged once at the end.
    Returns what the 1D loop leaves: (m_s, d_s, m_t, d_t, m_1, d_1, acc), each d and acc relative to its max."""
    R: tl.constexpr = BLOCK_V // SLOT
    m_s = tl.full([R], _NEG_BIG, tl.float32)
    d_s = tl.zeros([R], tl.float32)
    m_t = tl.full([R], _NEG_BIG, tl.float32)
    d_t = tl.zeros([R], tl.float32)
    m_1 = tl.full([R], _NEG_BIG, tl.float32)
    d_1 = tl.zeros([R], tl.float32)
    acc = tl.zeros([R], tl.float32)
    for start in range(0, V + lead, BLOCK_V):
        offs = start + tl.arange(0, R)[:, None] * SLOT + tl.arange(0, SLOT)[None, :]
        s = _load_tile(s_row, offs, s_stride_v, V, lead, KEEP, False, ALIGN)
        if DO_SOFT:
            t = _load_tile(t_row, offs, t_stride_v, V, lead, KEEP, False, ALIGN)
            zs = s * inv_T
            zt = t * inv_T
            m_s, d_s, r_s, e_s = _slot_update(m_s, d_s, zs)
            m_t, d_t, r_t, e_t = _slot_update(m_t, d_t, zt)
            if DIVERGENCE == 0:
                acc = acc * r_t + tl.sum(_mass_times(e_t, zt - zs), 1)
            elif DIVERGENCE == 1:
                acc = acc * r_s + tl.sum(_mass_times(e_s, zs - zt), 1)
        if DO_CE and not (SAME_T and DO_SOFT):
            if T_POW > 0:
                d_1 = d_1 * _ipow(r_s, T_POW) + tl.sum(_ipow(e_s, T_POW), 1)
            else:
                m_1, d_1, r_1, e_1 = _slot_update(m_1, d_1, s)
    # Merge the slots. acc is relative to the teacher's slot maxima (forward KL) or the student's (reverse KL);
    # the T_POW sum is relative to T times the student's.
    if DIVERGENCE == 0:
        acc = tl.sum(acc * tl.exp(m_t - tl.max(m_t, 0)), 0)
    else:
        acc = tl.sum(acc * tl.exp(m_s - tl.max(m_s, 0)), 0)
    if T_POW > 0:
        d_1 = tl.sum(d_1 * _ipow(tl.exp(m_s - tl.max(m_s, 0)), T_POW), 0)
        m_1 = tl.max(m_1, 0)
    else:
        m_1, d_1 = _merge_slots(m_1, d_1)
    m_s, d_s = _merge_slots(m_s, d_s)
    m_t, d_t = _merge_slots(m_t, d_t)
    return m_s, d_s, m_t, d_t, m_1, d_1, acc


@triton.jit
def _feature_row(
    row,
    fs_ptr, fs_stride_r, fs_stride_h,
    ft_ptr, ft_stride_r, ft_stride_h,
    grad_ptr,  # (M, H) contiguous, student feature dtype
    sq_ptr,  # (M,) fp32: sum_h (fs - ft)^2
    H, grad_coef,
    WRITE_GRAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One row of the feature MSE: its sum of squared differences, and its gradient grad_coef * (fs - ft)."""
    acc = tl.zeros([], tl.float32)
    for start in range(0, H, BLOCK_H):
        offs = start + tl.arange(0, BLOCK_H)
        mask = offs < H
        a = tl.load(fs_ptr + row * fs_stride_r + offs * fs_stride_h, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(ft_ptr + row * ft_stride_r + offs * ft_stride_h, mask=mask, other=0.0).to(tl.float32)
        diff = a - b
        acc += tl.sum(diff * diff, 0)
        if WRITE_GRAD:
            tl.store(grad_ptr + row * H + offs, (grad_coef * diff).to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(sq_ptr + row, acc)


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
    T_POW: tl.constexpr,  # 0, or T itself (2 or 4) when the CE softmax is derived from the soft one (see below)
    WRITE_GRAD: tl.constexpr,
    SINGLE: tl.constexpr,  # BLOCK_V >= V: the whole row in registers
    L2: tl.constexpr,  # tiled path: alternate the passes' directions, with L2 hints (L2_ORDER above)
    ROW_MULT: tl.constexpr,  # 1, or a power of 2 that divides both row strides and V (ROW_ALIGN_HINTS above)
    WARP_TILES: tl.constexpr,  # tiled path: pass 1 in warp-sized slots (WARP_TILES above)
    SLOT: tl.constexpr,  # one warp's vector-load width in elements: 32 lanes x 16 bytes
    ALIGN: tl.constexpr,  # tiled path: 0, or the elements of 16 bytes, for loads from aligned-down rows (ALIGNED_LOADS)
    BLOCK_V: tl.constexpr,
    # The feature MSE, in the same launch: programs N .. N + M - 1 take its M rows (_feature_row).
    fs_ptr=None, fs_stride_r=0, fs_stride_h=0, ft_ptr=None, ft_stride_r=0, ft_stride_h=0, fgrad_ptr=None,
    sq_ptr=None, N=0, H=0, f_coef=0.0,
    HAS_FEATURES: tl.constexpr = False,
    WRITE_FGRAD: tl.constexpr = False,
    BLOCK_H: tl.constexpr = 16,
):
    if ROW_MULT > 1:
        # (x // m) * m is x here (the launcher checked), and is what the compiler's alignment analysis can read:
        # tl.multiple_of does not take on a scalar argument.
        s_stride_r = s_stride_r // ROW_MULT * ROW_MULT
        t_stride_r = t_stride_r // ROW_MULT * ROW_MULT
        V = V // ROW_MULT * ROW_MULT  # the gradient's row stride, and the end of the row masks
    row = tl.program_id(0).to(tl.int64)
    if HAS_FEATURES and row >= N:
        _feature_row(row - N, fs_ptr, fs_stride_r, fs_stride_h, ft_ptr, ft_stride_r, ft_stride_h, fgrad_ptr, sq_ptr,
                     H, f_coef, WRITE_FGRAD, BLOCK_H)
        return
    if ALIGN > 0:  # s and t rows lie at the same offset `lead` from a 16-byte boundary (the launcher checked)
        first = row * s_stride_r
        lead = (first % ALIGN).to(tl.int32)
        s_row = s_ptr + (first - lead) // ALIGN * ALIGN
        t_row = t_ptr + (row * t_stride_r - lead) // ALIGN * ALIGN
    else:
        lead = 0
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
                m_s = tl.max(zs, 0)
                e_s = tl.exp(zs - m_s)
                d_s = tl.sum(e_s, 0)
                lse_s = m_s + tl.log(d_s)
                ls = zs - lse_s
                ps = e_s / d_s
                m_t = tl.max(zt, 0)
                e_t = tl.exp(zt - m_t)
                d_t = tl.sum(e_t, 0)
                lt = zt - (m_t + tl.log(d_t))
                pt = e_t / d_t
                kl_sm = 0.0
                if DIVERGENCE == 0:
                    D = tl.sum(_mass_times(pt, lt - ls), 0)
                elif DIVERGENCE == 1:
                    D = tl.sum(_mass_times(ps, ls - lt), 0)
                else:
                    lm = _log_mixture(lt, ls, log_beta, log_1m_beta)
                    kl_sm = tl.sum(_mass_times(ps, ls - lm), 0)
                    D = beta * tl.sum(_mass_times(pt, lt - lm), 0) + (1.0 - beta) * kl_sm
                row_loss += alpha * T * T * D
                if WRITE_GRAD:
                    g += (alpha * T) * _soft_grad(ls, lt, ps, pt, D, kl_sm, beta, log_beta, log_1m_beta, DIVERGENCE)
            if DO_CE:
                if SAME_T and DO_SOFT:
                    lse_1 = lse_s
                    q = ps
                elif T_POW > 0:  # exp(s - T m_s) = exp(zs - m_s) ** T: no max and no exp of its own
                    e_1 = _ipow(e_s, T_POW)
                    d_1 = tl.sum(e_1, 0)
                    lse_1 = m_s * T + tl.log(d_1)
                    q = e_1 / d_1
                else:
                    m_1 = tl.max(s, 0)
                    e_1 = tl.exp(s - m_1)
                    d_1 = tl.sum(e_1, 0)
                    lse_1 = m_1 + tl.log(d_1)
                    q = e_1 / d_1
                in_range = (lab >= 0) & (lab < V)
                s_lab = tl.load(s_row + lab * s_stride_v, mask=in_range, other=0.0).to(tl.float32)
                row_loss += (1.0 - alpha) * (lse_1 - s_lab)
                if WRITE_GRAD:
                    g += (1.0 - alpha) * (q - tl.where(offs == lab, 1.0, 0.0))
            if WRITE_GRAD:
                tl.store(g_row + offs, (g * scale).to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            # ---- pass 1: online softmax over tiles; for forward/reverse KL also a running sum for D ----
            last_start = (V + lead - 1) // BLOCK_V * BLOCK_V
            # With L2: pass 1 forward, kept in L2; the jsd pass backward, kept; pass 2 the other way, dropped.
            JSD_PASS: tl.constexpr = DO_SOFT and DIVERGENCE == 2
            if WARP_TILES:
                m_s, d_s, m_t, d_t, m_1, d_1, acc = _pass1_slots(
                    s_row, s_stride_v, t_row, t_stride_v, V, lead, inv_T, DIVERGENCE, DO_SOFT, DO_CE, SAME_T, T_POW,
                    L2 and WRITE_GRAD, ALIGN, BLOCK_V, SLOT)
            else:
                m_s = tl.full([], _NEG_BIG, tl.float32)
                d_s = tl.zeros([], tl.float32)
                m_t = tl.full([], _NEG_BIG, tl.float32)
                d_t = tl.zeros([], tl.float32)
                m_1 = tl.full([], _NEG_BIG, tl.float32)
                d_1 = tl.zeros([], tl.float32)
                acc = tl.zeros([], tl.float32)  # sum exp(z - m) (zt - zs) with z = zt (forward) or zs (reverse)
                for start in range(0, V + lead, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    s = _load_tile(s_row, offs, s_stride_v, V, lead, L2 and WRITE_GRAD, False, ALIGN)
                    if DO_SOFT:
                        t = _load_tile(t_row, offs, t_stride_v, V, lead, L2 and WRITE_GRAD, False, ALIGN)
                        zs = s * inv_T
                        zt = t * inv_T
                        m_s, d_s, r_s, e_s = _online_update(m_s, d_s, zs)
                        m_t, d_t, r_t, e_t = _online_update(m_t, d_t, zt)
                        if DIVERGENCE == 0:
                            acc = acc * r_t + tl.sum(_mass_times(e_t, zt - zs), 0)
                        elif DIVERGENCE == 1:
                            acc = acc * r_s + tl.sum(_mass_times(e_s, zs - zt), 0)
                    if DO_CE and not (SAME_T and DO_SOFT):
                        if T_POW > 0:  # the running max of s is T times that of zs: rescale and exps are powers
                            d_1 = d_1 * _ipow(r_s, T_POW) + tl.sum(_ipow(e_s, T_POW), 0)
                        else:
                            m_1, d_1, r_1, e_1 = _online_update(m_1, d_1, s)
            lse_s = m_s + tl.log(d_s)
            lse_t = m_t + tl.log(d_t)
            lse_1 = m_1 + tl.log(d_1)
            if SAME_T and DO_SOFT:
                lse_1 = lse_s
            if T_POW > 0:
                lse_1 = m_s * T + tl.log(d_1)
                c_1 = tl.exp(lse_s * T - lse_1)  # q = exp(s - lse_1) = ps ** T * c_1 in pass 2

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
                    for start in range(0, V + lead, BLOCK_V):
                        offs = _tile_offsets(start, last_start, L2, BLOCK_V)
                        keep, drop = L2 and WRITE_GRAD, L2 and not WRITE_GRAD
                        s = _load_tile(s_row, offs, s_stride_v, V, lead, keep, drop, ALIGN)
                        t = _load_tile(t_row, offs, t_stride_v, V, lead, keep, drop, ALIGN)
                        ls = s * inv_T - lse_s
                        lt = t * inv_T - lse_t
                        lm = _log_mixture(lt, ls, log_beta, log_1m_beta)
                        kl_tm += tl.sum(_mass_times(tl.exp(lt), lt - lm), 0)
                        kl_sm += tl.sum(_mass_times(tl.exp(ls), ls - lm), 0)
                    D = beta * kl_tm + (1.0 - beta) * kl_sm
                row_loss += alpha * T * T * D
            if DO_CE:
                in_range = (lab >= 0) & (lab < V)
                s_lab = tl.load(s_row + (lab + lead) * s_stride_v, mask=in_range, other=0.0).to(tl.float32)
                row_loss += (1.0 - alpha) * (lse_1 - s_lab)

            # ---- pass 2: the gradient, from the row statistics ----
            if WRITE_GRAD:
                for start in range(0, V + lead, BLOCK_V):
                    offs = _tile_offsets(start, last_start, L2 and not JSD_PASS, BLOCK_V)
                    s = _load_tile(s_row, offs, s_stride_v, V, lead, False, L2, ALIGN)
                    col = offs - lead  # the tile's columns (offs itself unless ALIGN)
                    if ALIGN > 0:
                        mask = (col >= 0) & (col < V)
                    else:
                        mask = col < V
                    g = tl.zeros([BLOCK_V], dtype=tl.float32)
                    ps = g
                    if DO_SOFT:
                        t = _load_tile(t_row, offs, t_stride_v, V, lead, False, L2, ALIGN)
                        ls = s * inv_T - lse_s
                        lt = t * inv_T - lse_t
                        ps = tl.exp(ls)
                        pt = tl.exp(lt)
                        g += (alpha * T) * _soft_grad(ls, lt, ps, pt, D, kl_sm, beta, log_beta, log_1m_beta, DIVERGENCE)
                    if DO_CE:
                        if SAME_T and DO_SOFT:
                            q = ps
                        elif T_POW > 0:
                            q = _ipow(ps, T_POW) * c_1
                        else:
                            q = tl.exp(s - lse_1)
                        g += (1.0 - alpha) * (q - tl.where(col == lab, 1.0, 0.0))
                    g = (g * scale).to(grad_ptr.dtype.element_ty)
                    if L2:
                        tl.store(g_row + col, g, mask=mask, eviction_policy="evict_first")
                    else:
                        tl.store(g_row + col, g, mask=mask)
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


# The tiled path autotunes tile width and warps (on a GPU only). The single-read path takes its warps from the row
# width: 16 elements of each row per thread keeps it near 120 registers with no spills on sm_90 (checked with
# cuobjdump -res-usage on the compiled kernel: 4 warps at 8192 columns spill).
_fwd_tiled = triton.autotune(
    configs=[
        triton.Config({"BLOCK_V": b}, num_warps=w)
        for b, w in ((2048, 8), (4096, 8), (4096, 16), (8192, 16), (8192, 32))
    ],
    # the candidates' settings are in the key, so each is tuned on its own
    key=["V", "DIVERGENCE", "DO_SOFT", "DO_CE", "WRITE_GRAD", "T_POW", "L2", "ROW_MULT", "WARP_TILES", "ALIGN"],
)(_kd_loss_fwd_kernel)


# None: warps from the row width (below). A number: that many for every whole-row launch (a benchmark candidate).
SINGLE_WARPS: int | None = None


def _single_num_warps(block: int) -> int:
    return SINGLE_WARPS or max(4, min(16, block // 512))


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------


def _row_multiple(s: torch.Tensor, t: torch.Tensor) -> int:
    """The ROW_MULT hint: the largest power of 2, at most one 16-byte vector of elements, dividing V and both row
    strides (1 with ROW_ALIGN_HINTS off, or for a strided last dimension, which is read element by element)."""
    if not ROW_ALIGN_HINTS or s.stride(1) != 1 or t.stride(1) != 1:
        return 1
    mult = 16 // min(s.element_size(), t.element_size())
    while mult > 1 and any(x % mult for x in (s.shape[1], s.stride(0), t.stride(0))):
        mult //= 2
    return mult


def _aligned_loads(s: torch.Tensor, t: torch.Tensor) -> int:
    """The ALIGN setting of a tiled launch: the elements of 16 bytes where ALIGNED_LOADS applies (contiguous rows of
    one dtype and one stride, from 16-byte aligned storage, whose starts are not all 16-byte aligned), else 0."""
    vec = 16 // s.element_size()
    applies = (ALIGNED_LOADS and s.dtype == t.dtype and s.stride(1) == t.stride(1) == 1
               and s.stride(0) == t.stride(0) and s.stride(0) % vec != 0
               and s.data_ptr() % 16 == 0 and t.data_ptr() % 16 == 0)
    return vec if applies else 0


def _check_supported(x: torch.Tensor, what: str) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise KdLossInputError(f"kd_loss (triton): {what} must be fp32, bf16 or fp16, got {x.dtype}")
    if not x.is_cuda and not _interpreting():
        raise KdLossInputError(
            f"kd_loss (triton): {what} is on {x.device}; CPU tensors need TRITON_INTERPRET=1 (or KDBENCH_KERNEL=torch)"
        )


def kd_loss_forward(s, t, labels, opts, want_grad: bool, features=None, want_grad_f: bool = False):
    """Launch the fused kernel on s, t (N, V), and on features = (fs, ft) (M, H) when given, in one launch.
    Returns (row losses (N,) fp32, grad (N, V) or None, scale (1,), feature part), the feature part being None or
    (the feature term: (M,) for 'none', else a scalar; its gradient (M, H) or None)."""
    n, v = s.shape
    dev = s.device
    rows = torch.empty(n, dtype=torch.float32, device=dev)
    grad = torch.empty((n, v), dtype=s.dtype, device=dev) if want_grad else None
    feature_args, m = _feature_launch(features, opts, want_grad_f, n) if features is not None else ({}, 0)
    # The batchmean divisor stays on the device: no host sync.
    if opts["reduction"] == "batchmean" and labels is not None:
        scale = 1.0 / (labels != opts["ignore_index"]).sum().clamp_min(1).to(torch.float32).reshape(1)
    elif opts["reduction"] == "batchmean":
        scale = torch.full((1,), 1.0 / max(n, 1), dtype=torch.float32, device=dev)
    else:
        scale = torch.ones(1, dtype=torch.float32, device=dev)
    if n + m == 0:
        return rows, grad, scale, _feature_term(feature_args, opts, features)

    args, meta = _launch_args(s, t, labels, rows, grad if want_grad else rows, scale, opts, want_grad)
    meta.update(feature_args)
    grid = (n + m,)
    block = triton.next_power_of_2(v)
    if block <= MAX_FUSED_V:
        _kd_loss_fwd_kernel[grid](*args, SINGLE=True, BLOCK_V=block, num_warps=_single_num_warps(block), **meta)
    elif _interpreting():
        _kd_loss_fwd_kernel[grid](*args, SINGLE=False, BLOCK_V=max(INTERPRET_BLOCK_V, meta["SLOT"]), **meta)
    else:
        _fwd_tiled[grid](*args, SINGLE=False, **meta)
    return rows, grad, scale, _feature_term(feature_args, opts, features)


def _launch_args(s, t, labels, rows, grad, scale, opts, want_grad: bool) -> tuple[tuple, dict]:
    """The kernel's runtime arguments and constexprs for s, t (N, V), under the module's settings above (the
    candidates: tiled-path settings are off for whole rows). rows, grad and scale are its outputs (or, to
    compile only, their dtypes); grad is `rows` when no gradient is written."""
    n, v = s.shape
    T, alpha, beta = float(opts["temperature"]), float(opts["alpha"]), float(opts["beta"])
    divergence = _DIVERGENCE_CODE[opts["divergence"]]
    has_labels = labels is not None
    beta_in = beta if divergence == _JSD else 0.5  # log(beta) is used by jsd only
    args = (
        s, s.stride(0), s.stride(1),
        t, t.stride(0), t.stride(1),
        labels if has_labels else rows, grad, rows, scale,
        v, 1.0 / T, T, alpha, beta_in, math.log(beta_in), math.log1p(-beta_in),
        int(opts["ignore_index"]),
    )
    do_soft, do_ce = alpha != 0.0, alpha != 1.0 and has_labels
    tiled = triton.next_power_of_2(v) > MAX_FUSED_V
    meta = dict(
        DIVERGENCE=divergence,
        HAS_LABELS=has_labels,
        DO_SOFT=do_soft,
        DO_CE=do_ce,
        SAME_T=T == 1.0,
        # T = 2 or 4 (where 1/T is exact), with both terms on: the CE softmax from the soft one's exps
        T_POW=int(T) if CE_FROM_SOFT and T in (2.0, 4.0) and do_soft and do_ce else 0,
        WRITE_GRAD=want_grad,
        ROW_MULT=_row_multiple(s, t),
        SLOT=32 * 16 // s.element_size(),
        L2=L2_ORDER and tiled,
        WARP_TILES=WARP_TILES and tiled,
        ALIGN=_aligned_loads(s, t) if tiled else 0,
    )
    return args, meta


def precompile_tiled(student_logits, teacher_logits, labels=None, **kd_loss_kwargs) -> list:
    """Thunks that each compile one autotune config of the tiled kernel for this kd_loss call (fwd + bwd), under
    the module's current settings: what the autotuner compiles one after another at its first launch, to run in
    parallel threads before it (Triton's compile releases the GIL). Empty for whole rows, or without CUDA."""
    if _interpreting() or not student_logits.is_cuda:
        return []
    return [functools.partial(_kd_loss_fwd_kernel.warmup, *args, **kwargs)
            for args, kwargs in _tiled_launches(student_logits, teacher_logits, labels, **kd_loss_kwargs)]


def _tiled_launches(student_logits, teacher_logits, labels=None, **kd_loss_kwargs) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of the tiled kernel under each autotune config, as kd_loss(...) with a gradient would launch
    it, its outputs given as dtypes (Triton compiles for 16-byte aligned pointers of a type, as torch allocates)."""
    opts = dict(temperature=1.0, alpha=0.5, divergence="forward_kl", beta=0.5, ignore_index=-100,
                reduction="batchmean", feature_weight=0.0)
    opts.update(kd_loss_kwargs)
    s, t, lab, _ = validate(student_logits, teacher_logits, labels, student_features=None, teacher_features=None,
                            **opts)
    n, v = s.shape
    if n == 0 or triton.next_power_of_2(v) <= MAX_FUSED_V:
        return []
    args, meta = _launch_args(s, t, lab, torch.float32, s.dtype, torch.float32, opts, want_grad=True)
    return [(args, dict(grid=(n,), SINGLE=False, **meta, **config.all_kwargs())) for config in _fwd_tiled.configs]


def _feature_launch(features, opts, want_grad: bool, n: int) -> tuple[dict, int]:
    """The kernel's feature arguments for (fs, ft) (M, H) after n logit rows, and M: programs n .. n + M - 1 compute
    the MSE rows."""
    fs, ft = features
    m, h = fs.shape
    sq = torch.empty(m, dtype=torch.float32, device=fs.device)
    fgrad = torch.empty((m, h), dtype=fs.dtype, device=fs.device) if want_grad else None
    denom = h if opts["reduction"] == "none" else m * h
    return dict(
        fs_ptr=fs, fs_stride_r=fs.stride(0), fs_stride_h=fs.stride(1),
        ft_ptr=ft, ft_stride_r=ft.stride(0), ft_stride_h=ft.stride(1),
        fgrad_ptr=fgrad if want_grad else sq, sq_ptr=sq, N=n, H=h,
        f_coef=2.0 * float(opts["feature_weight"]) / max(denom, 1),
        HAS_FEATURES=True, WRITE_FGRAD=want_grad, BLOCK_H=min(triton.next_power_of_2(h), 4096),
    ), m


def _feature_term(feature_args: dict, opts, features):
    """(the feature term, its gradient or None) from the kernel's per-row sums, or None without features."""
    if features is None:
        return None
    sq = feature_args["sq_ptr"]
    m, h = features[0].shape
    weight = float(opts["feature_weight"])
    term = sq * (weight / h) if opts["reduction"] == "none" else sq.sum() * (weight / max(m * h, 1))
    return term, (feature_args["fgrad_ptr"] if feature_args["WRITE_FGRAD"] else None)


def scale_rows_(grad: torch.Tensor, go: torch.Tensor) -> None:
    """grad (N, X) contiguous *= go ((N,) or scalar), in place, in fp32."""
    n, x = grad.shape
    if n == 0 or x == 0:
        return
    go = go.to(torch.float32)
    go_stride = 0 if go.dim() == 0 else go.stride(0)
    block = min(triton.next_power_of_2(x), 4096)
    _scale_rows_kernel[(n, triton.cdiv(x, block))](grad, go, go_stride, x, BLOCK=block)


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------


class KdLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, labels, fs, ft, opts, want_grad_s, want_grad_f):
        features = (fs, ft) if fs is not None else None
        rows, grad, scale, feature_part = kd_loss_forward(s, t, labels, opts, want_grad_s, features, want_grad_f)
        reduction = opts["reduction"]
        loss = rows if reduction == "none" else (rows.sum() if reduction == "sum" else rows.sum() * scale[0])
        grad_f = None
        if feature_part is not None:
            term, grad_f = feature_part
            loss = loss + term
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
        # One host sync to skip a full read+write of the gradient in the common loss.backward() case.
        if ctx.reduction != "none" and bool(go == 1):
            return grad, None, None, grad_f, None, None, None, None
        ctx.scaled = True
        for g in (grad, grad_f):
            if g is not None:
                scale_rows_(g, go)
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
    _check_supported(s, "student_logits")
    _check_supported(t, "teacher_logits")
    fs, ft = feats if feats is not None else (None, None)
    if fs is not None:
        _check_supported(fs, "student_features")
        _check_supported(ft, "teacher_features")
    grad_on = torch.is_grad_enabled()
    want_grad_s = grad_on and student_logits.requires_grad
    want_grad_f = grad_on and fs is not None and fs.requires_grad
    ft = None if ft is None else ft.detach()
    return KdLossFunction.apply(s, t.detach(), lab, fs, ft, opts, want_grad_s, want_grad_f)


kd_loss.__doc__ = KD_LOSS_DOC
