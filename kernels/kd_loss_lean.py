"""The lean math shared by the split-row (kd_loss_split.py) and persistent (kd_loss_persistent.py) kd_loss kernels.

It covers a chunk's statistics, their merge into a row's, the per-row and per-chunk coefficients, and the gradient
from what a program keeps in registers. It also holds the two launchers' common host-side pieces (those they share
with the committed kernel are kd_loss_triton.py's, the feature term is kd_features.py). The loss contract is
KD_LOSS_DOC (kernels/front.py).

Math, in base-2 units, so that every exp is one FFMA and one MUFU.EX2: c = log2(e) / T.
    per chunk (a whole row for the persistent kernel), on s, t as fp32 with -inf outside the row:
        mu_s = max(c s)   e_s = exp2(c s - mu_s)   d_s = sum e_s       (the same for t; the CE's at T = 1 uses
        mu_1 = max(log2(e) s), e_1 = exp2(log2(e) s - mu_1); e_1 = e_s ** T at integer T = 2..4, T_POW, no exp)
        every mu is floored at -3e38, so a chunk with nothing but -inf still has finite exponents
    the row, from its chunks k: mu = max_k mu_k, d = sum_k d_k exp2(mu_k - mu), L = mu + log2 d  (= lse / ln 2)
    forward KL  D = A / (d_t T) + ln2 (L_s - L_t),   A = sum e_t (t - s)    (no per-element log, as the old kernel)
    reverse KL  D = A / (d_s T) + ln2 (L_t - L_s),   A = sum e_s (s - t)
    jsd         needs log m, m = b p_t + (1 - b) p_s, from the finished L: a second round per row.
    A probability from what a chunk keeps: p_s = e_s exp2(mu_s,k - L_s), a scalar per chunk, so no exp again.
    gradient   g = a dD/dz_s + b (q - onehot),   a = scale alpha T,  b = scale (1 - alpha),  0 on ignored rows:
        forward KL  A_s e_s - A_t e_t + A_1 e_1                              (3 FMA)
        reverse KL  where(e_s > 0, e_s ((s - t) P + Q), 0) + A_1 e_1        (p_s (z_s - z_t - ln2 (L_s - L_t) - D))
        jsd         where(p_s > 0, p_s (u P + Q), 0) + A_1 e_1,  u = log2(p_s / m)
    The one-hot term is no per-element compare: after the vector store (and a barrier), the program that holds the
    label's column stores that one element again with -b, computed by the same element functions on scalars.
A term p x with p = 0 is 0 (a where on p > 0), so -inf logits never make 0 * -inf = NaN.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdbench.kernels.kd_features import feature_args, no_features
from kdbench.kernels.kd_loss_triton import row_scale

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NEG_BIG = tl.constexpr(-3.0e38)  # the floor of every max: finite, so exp2(mu_k - mu) is never exp2(-inf + inf)

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
DIVERGENCE_CODE = {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "jsd": JSD}
# Statistics slots of a chunk in the split kernel's (N, N_STATS, C) workspace; KL_TM and KL_SM are jsd's second
# round (each chunk's share of sum p log2(p / m)), in slots of their own.
MU_S, MU_T, MU_1, D_S, D_T, D_1, ACC, KL_TM, KL_SM = (tl.constexpr(k) for k in range(9))
N_STATS = tl.constexpr(9)


# ----------------------------------------------------------------------------------------------------------------
# Element and chunk math (@triton.jit, inlined into both kernels)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _ipow(x, N: tl.constexpr):
    y = x
    for _ in tl.static_range(N - 1):
        y = y * x
    return y


@triton.jit
def add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _max2(a0, a1, b0, b1):
    return tl.maximum(a0, b0), tl.maximum(a1, b1)


@triton.jit
def row_aligned(s_stride_r, t_stride_r, V, ROW_MULT: tl.constexpr):
    """The row strides and V as x // m * m: the same integers (the launcher checked that m divides each, see
    row_multiple) in the form Triton's alignment analysis reads, so rows load 16 bytes per instruction."""
    if ROW_MULT > 1:
        s_stride_r = s_stride_r // ROW_MULT * ROW_MULT
        t_stride_r = t_stride_r // ROW_MULT * ROW_MULT
        V = V // ROW_MULT * ROW_MULT
    return s_stride_r, t_stride_r, V


@triton.jit
def chunk_maxima(s, t, c, DO_SOFT: tl.constexpr, DO_CE: tl.constexpr, T_POW: tl.constexpr):
    """(mu_s, mu_t, mu_1) of a chunk: one reduction for both maxima; the CE's max is the soft one's times T."""
    if DO_SOFT:
        m_s, m_t = tl.reduce((s, t), 0, _max2)
    else:
        m_s = tl.max(s, 0)
        m_t = m_s
    mu_s = tl.maximum(m_s * c, NEG_BIG)
    mu_1 = mu_s
    if DO_CE:
        if DO_SOFT and T_POW > 0:
            mu_1 = tl.maximum(mu_s * T_POW, NEG_BIG)
        else:
            mu_1 = tl.maximum(m_s * LOG2E, NEG_BIG)
    return mu_s, tl.maximum(m_t * c, NEG_BIG), mu_1


@triton.jit
def elems(s, t, c, mu_s, mu_t, mu_1, DIVERGENCE: tl.constexpr, DO_SOFT: tl.constexpr, DO_CE: tl.constexpr,
          SAME_T: tl.constexpr, T_POW: tl.constexpr):
    """The element terms of a chunk with maxima mu_*: (e_s, e_t, e_1, part of A, x1, x2), x1 and x2 what the
    gradient keeps: (e_s, e_t) forward KL, (e_s, s - t) reverse KL, (s, t) jsd. On vectors (a chunk) or on
    scalars (the label's element, for the one-hot fix-up), so both are the same arithmetic."""
    zero = tl.zeros_like(s)
    x1 = s
    x2 = t
    e_s = zero
    e_t = zero
    part = zero
    if DO_SOFT:
        e_s = tl.exp2(s * c - mu_s)
        e_t = tl.exp2(t * c - mu_t)
        if DIVERGENCE == 0:
            part = e_t * tl.where(e_t > 0, t - s, 0.0)  # the multiply fuses into the sum's add (FFMA)
            x1 = e_s
            x2 = e_t
        elif DIVERGENCE == 1:
            diff = s - t
            part = e_s * tl.where(e_s > 0, diff, 0.0)
            x1 = e_s
            x2 = diff
    e_1 = zero
    if DO_CE and not (DO_SOFT and SAME_T):  # at T = 1 the CE softmax is the soft one
        if DO_SOFT and T_POW > 0:
            e_1 = _ipow(e_s, T_POW)
        else:
            e_1 = tl.exp2(s * LOG2E - mu_1)
    return e_s, e_t, e_1, part, x1, x2


@triton.jit
def chunk_stats(s, t, c, DIVERGENCE: tl.constexpr, DO_SOFT: tl.constexpr, DO_CE: tl.constexpr,
                SAME_T: tl.constexpr, T_POW: tl.constexpr):
    """Statistics of one chunk s, t ([B] fp32, -inf outside the row): (mu_s, mu_t, mu_1, d_s, d_t, d_1, A) and
    the kept (x1, x2, e_1) of elems(). Two reductions: the maxima, then the four sums together."""
    mu_s, mu_t, mu_1 = chunk_maxima(s, t, c, DO_SOFT, DO_CE, T_POW)
    e_s, e_t, e_1, part, x1, x2 = elems(s, t, c, mu_s, mu_t, mu_1, DIVERGENCE, DO_SOFT, DO_CE, SAME_T, T_POW)
    d_s, d_t, d_1, acc = tl.reduce((e_s, e_t, e_1, part), 0, _add4)
    if DO_CE and DO_SOFT and SAME_T:
        d_1 = d_s
    return mu_s, mu_t, mu_1, d_s, d_t, d_1, acc, x1, x2, e_1


@triton.jit
def _max3(a0, a1, a2, b0, b1, b2):
    return tl.maximum(a0, b0), tl.maximum(a1, b1), tl.maximum(a2, b2)


@triton.jit
def merge(mu_s, mu_t, mu_1, d_s, d_t, d_1, acc, mask, DIVERGENCE: tl.constexpr):
    """A row's (mu_s, mu_t, mu_1, d_s, d_t, d_1, A) from its chunks' [CMAX] statistics (mask: the row's chunks):
    each d_k and A_k (relative to exp2 of its chunk's max of t for forward KL, of s otherwise) brought to the
    row's max. Two reductions: the three maxima, then the four sums."""
    M_s, M_t, M_1 = tl.reduce((tl.where(mask, mu_s, NEG_BIG), tl.where(mask, mu_t, NEG_BIG),
                               tl.where(mask, mu_1, NEG_BIG)), 0, _max3)
    w_s = tl.where(mask, tl.exp2(mu_s - M_s), 0.0)
    w_t = tl.where(mask, tl.exp2(mu_t - M_t), 0.0)
    w_1 = tl.where(mask, tl.exp2(mu_1 - M_1), 0.0)
    D_s, D_t, D_1, A = tl.reduce((d_s * w_s, d_t * w_t, d_1 * w_1, acc * (w_t if DIVERGENCE == 0 else w_s)), 0,
                                 _add4)
    return M_s, M_t, M_1, D_s, D_t, D_1, A


@triton.jit
def soft_divergence(A, d_s, d_t, L_s, L_t, inv_T, DIVERGENCE: tl.constexpr):
    """D of forward or reverse KL from a row's merged statistics (jsd: 0 here, its D comes from the second round)."""
    if DIVERGENCE == 0:
        D = A / d_t * inv_T + LN2 * (L_s - L_t)
    elif DIVERGENCE == 1:
        D = A / d_s * inv_T + LN2 * (L_t - L_s)
    else:
        D = 0.0
    return D


@triton.jit
def jsd_elems(s, t, c, L_s, L_t, beta):
    """jsd, second round: (p_s, u = log2(p_s / m), its share sum p_s u, sum p_t log2(p_t / m)) for s, t."""
    y_s = s * c - L_s
    y_t = t * c - L_t
    ps = tl.exp2(y_s)
    pt = tl.exp2(y_t)
    lm = tl.log2(beta * pt + (1.0 - beta) * ps)
    u = y_s - lm
    part_s = tl.where(ps > 0, ps * u, 0.0)
    part_t = tl.where(pt > 0, pt * (y_t - lm), 0.0)
    return ps, u, part_s, part_t


@triton.jit
def grad_coefs(mu_s, mu_t, mu_1, L_s, L_t, L_1, D, kl_sm, a, b, inv_T, beta, valid,
               DIVERGENCE: tl.constexpr, DO_SOFT: tl.constexpr, DO_CE: tl.constexpr, SAME_T: tl.constexpr):
    """The per-chunk scalars (A_s, A_t, A_1, P, Q) of grad() (top comment), for a chunk whose maxima are mu_*;
    all 0 on an ignored row (whose L may be -inf or NaN)."""
    A_s = 0.0
    A_t = 0.0
    A_1 = 0.0
    P = 0.0
    Q = 0.0
    if DO_SOFT:
        k_s = tl.exp2(mu_s - L_s)
        if DIVERGENCE == 0:
            A_s = a * k_s
            A_t = a * tl.exp2(mu_t - L_t)
        elif DIVERGENCE == 1:
            P = a * k_s * inv_T
            Q = -a * k_s * (LN2 * (L_s - L_t) + D)
        else:
            P = (1.0 - beta) * a * LN2
            Q = -(1.0 - beta) * a * kl_sm
    if DO_CE:
        k_1 = tl.exp2(mu_1 - L_1)
        if DO_SOFT and SAME_T:
            if DIVERGENCE == 0:
                A_s += b * k_1
            elif DIVERGENCE == 1:
                Q += b * k_1
            else:
                Q += b  # q = p_s, which x1 already is
        else:
            A_1 = b * k_1
    return (tl.where(valid, A_s, 0.0), tl.where(valid, A_t, 0.0), tl.where(valid, A_1, 0.0),
            tl.where(valid, P, 0.0), tl.where(valid, Q, 0.0))


@triton.jit
def grad(x1, x2, e_1, A_s, A_t, A_1, P, Q, DIVERGENCE: tl.constexpr, DO_SOFT: tl.constexpr, DO_CE: tl.constexpr,
         SAME_T: tl.constexpr, T_POW: tl.constexpr):
    """The gradient (without the one-hot term) from what is kept: forward KL (e_s, e_t), reverse KL (e_s, s - t),
    jsd (p_s, u); e_1 the CE's exps (with T_POW, e_s ** T again: one multiply instead of a register array)."""
    g = tl.zeros_like(x1)
    if DO_SOFT and DIVERGENCE == 0 and DO_CE and T_POW > 0:
        # x1 (A_s + A_1 x1 ** (T - 1)) - A_t x2: 3 instructions at T = 2, and the CE's e_s ** T array is never
        # kept (nor the product chunk_stats summed, which the compiler would keep live to here otherwise)
        h = A_1 * x1
        for _ in tl.static_range(T_POW - 2):
            h = h * x1
        g = x1 * (h + A_s) - A_t * x2
    else:
        if DO_SOFT:
            if DIVERGENCE == 0:
                g = A_s * x1 - A_t * x2
            else:
                g = tl.where(x1 > 0, x1 * (x2 * P + Q), 0.0)  # NaN-safe: p_s may be NaN on an ignored row
        if DO_CE and not (DO_SOFT and SAME_T):
            if DO_SOFT and T_POW > 0 and DIVERGENCE != 2:
                q = A_1 * x1  # (A_1 e_s) e_s ...: see above
                for _ in tl.static_range(T_POW - 1):
                    q = q * x1
                g += q
            else:
                g += A_1 * e_1
    return g


@triton.jit
def row_loss(D, L_t, L_1, s_lab, alpha, T, valid, DO_SOFT: tl.constexpr, DO_CE: tl.constexpr):
    """alpha T^2 D + (1 - alpha) (lse_1 - s[label]), 0 on an ignored row; NaN on a valid row whose teacher L_t is
    not finite (NaN or +inf in it, or nothing but -inf), whatever D came to (issue 14: never a finite loss over
    NaN gradients)."""
    loss = 0.0
    if DO_SOFT:
        loss += alpha * T * T * D
    if DO_CE:
        loss += (1.0 - alpha) * (LN2 * L_1 - s_lab)
    if DO_SOFT:
        loss = tl.where(tl.abs(L_t) < float("inf"), loss, float("nan"))
    return tl.where(valid, loss, 0.0)


@triton.jit
def label_grad(s_l, t_l, c, mu_s, mu_t, mu_1, L_s, L_t, beta, A_s, A_t, A_1, P, Q, b,
               DIVERGENCE: tl.constexpr, DO_SOFT: tl.constexpr, DO_CE: tl.constexpr, SAME_T: tl.constexpr,
               T_POW: tl.constexpr):
    """The gradient at the label's column, one-hot term included: the chunk's own element functions, on the
    label's two logits."""
    e_s, e_t, e_1, part, x1, x2 = elems(s_l, t_l, c, mu_s, mu_t, mu_1, DIVERGENCE, DO_SOFT, DO_CE, SAME_T, T_POW)
    if DO_SOFT and DIVERGENCE == 2:
        x1, x2, part_s, part_t = jsd_elems(s_l, t_l, c, L_s, L_t, beta)
    return grad(x1, x2, e_1, A_s, A_t, A_1, P, Q, DIVERGENCE, DO_SOFT, DO_CE, SAME_T, T_POW) - b


# ----------------------------------------------------------------------------------------------------------------
# Host side, shared by both launchers
# ----------------------------------------------------------------------------------------------------------------


def row_multiple(s: torch.Tensor, t: torch.Tensor) -> int:
    """The largest power of 2, at most one 16-byte vector of elements, dividing V and both row strides (1 for a
    strided last dimension). The kernels rewrite those integers as x // m * m, which is what Triton's alignment
    analysis reads: V = 1000 rows then load 16 bytes per instruction instead of 4."""
    if s.stride(1) != 1 or t.stride(1) != 1:
        return 1
    mult = 16 // min(s.element_size(), t.element_size())
    while mult > 1 and any(x % mult for x in (s.shape[1], s.stride(0), t.stride(0))):
        mult //= 2
    return mult


def scalar_args(s, t, labels, opts, want_grad: bool, t_pow: bool) -> tuple[tuple, dict]:
    """(c, T, inv_T, alpha, beta, ignore_index) and the constexprs both kernels share."""
    T, alpha = float(opts["temperature"]), float(opts["alpha"])
    divergence = DIVERGENCE_CODE[opts["divergence"]]
    beta = float(opts["beta"]) if divergence == JSD else 0.5
    has_labels = labels is not None
    do_soft, do_ce = alpha != 0.0, alpha != 1.0 and has_labels
    scalars = (math.log2(math.e) / T, T, 1.0 / T, alpha, beta, int(opts["ignore_index"]))
    meta = dict(
        DIVERGENCE=divergence, HAS_LABELS=has_labels, DO_SOFT=do_soft, DO_CE=do_ce, SAME_T=T == 1.0,
        # the CE's exps as powers of the soft ones: T an integer 2..4, both terms on
        T_POW=int(T) if t_pow and T in (2.0, 3.0, 4.0) and do_soft and do_ce else 0,
        WRITE_GRAD=want_grad, ROW_MULT=row_multiple(s, t),
    )
    return scalars, meta


def launch_parts(s, t, labels, opts, want_grad: bool, features, want_grad_f: bool, t_pow: bool):
    """What a launch of either kernel on s, t (N, V) shares: (outputs, head, scalars, tail, meta), outputs =
    (rows (N,) fp32, grad (N, V) or None, scale (1,), feature arguments); head the arguments before the kernel's
    own (logits, labels, outputs), scalars scalar_args', tail the feature arguments; meta the constexprs."""
    n, v = s.shape
    rows = torch.empty(n, dtype=torch.float32, device=s.device)
    grad = torch.empty((n, v), dtype=s.dtype, device=s.device) if want_grad else None
    scale = row_scale(labels, opts, n, s.device)
    fargs = feature_args(features, opts, want_grad_f, max_block=1024)
    scalars, meta = scalar_args(s, t, labels, opts, want_grad, t_pow)
    f = fargs or no_features(rows)
    head = (s, s.stride(0), s.stride(1), t, t.stride(0), t.stride(1), labels if labels is not None else rows,
            grad if want_grad else rows, rows, scale)
    tail = tuple(f[k] for k in ("fs_ptr", "fs_stride_r", "fs_stride_h", "ft_ptr", "ft_stride_r", "ft_stride_h",
                                "fgrad_ptr", "sq_ptr", "M", "H", "f_coef"))
    meta.update(HAS_FEATURES=f["HAS_FEATURES"], WRITE_FGRAD=f["WRITE_FGRAD"], BLOCK_H=f["BLOCK_H"])
    return (rows, grad, scale, fargs), head, scalars, tail, meta


_RESIDENT: dict[tuple, int] = {}  # (kernel, device, options, constexprs) -> programs per SM of the compiled kernel


def resident_programs(kernel, device, args, meta: dict, options: dict) -> int:
    """How many programs of `kernel`, compiled for these constexprs and options, the GPU holds at once (the first
    call for them compiles it)."""
    key = (kernel, device.index, tuple(sorted(options.items())), tuple(sorted(meta.items())))
    if key not in _RESIDENT:
        compiled = kernel.warmup(*args, grid=(1,), **options, **meta)
        _RESIDENT[key] = programs_per_sm(compiled, options["num_warps"])
    return sm_count(device) * _RESIDENT[key]


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (asked at launch, never at import)."""
    return _sm_count(torch.device(device).index or 0)


def _sm_count(index: int) -> int:
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


_SM_COUNTS: dict[int, int] = {}


def programs_per_sm(compiled, num_warps: int) -> int:
    """Resident programs per SM of a compiled kernel, from its registers and shared memory (Hopper limits:
    64K registers, 228 KB shared, 64 warps, 32 blocks per SM); 1 if the counts cannot be read."""
    try:
        compiled._init_handles()
        regs = max(int(compiled.n_regs), 1)
        shared = int(compiled.metadata.shared)
    except Exception:  # an older or newer Triton without these: one per SM is always resident
        return 1
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = 65536 // (regs_per_warp * num_warps)
    by_shared = (227 * 1024) // shared if shared else 32
    return max(1, min(by_regs, by_shared, 64 // num_warps, 32))

