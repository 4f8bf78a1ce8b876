"""kd_loss for small vocabularies: a persistent kernel, one warp per row, the next row loaded while the current one
computes (UNTIMED; opt-in, see TUNING.md).

Math and bytes (b = bytes per logit; the element math is kernels/kd_loss_lean.py's top comment)
------------------------------------------------------------------------------------------------------------
A row of V <= MAX_V logits sits whole in the registers of one program: 1 warp up to 1024 columns (32 per lane),
then 1 warp per 1024 (2 at 2048, 4 at 4096). A grid of as many programs as fit on the GPU at once walks the rows
with a stride of the grid. Per row:
    the row's maxima, its sums (d_s, d_t, d_1, A) in one reduction, D and the loss; the gradient from the exps
    still in registers (2 MUFU per element at T = 2..4, 3 otherwise, 2 at T = 1), the one-hot term as a scalar
    store at the label.
Software pipelining: the logits (and the label's two logits) of the program's next row are loaded before the
current row's math, and its label one row earlier still. So no load waits on a label, nothing branches on one
(an ignored row's loads are masked off, and its gradient is zero by its coefficients), and the loads of one row
overlap the arithmetic of the other. Loads are 16 bytes wide where the row stride allows (ROW_MULT).
Bytes: 3 b N V, the minimum (ignored rows: b V, the zeros written). Rows of one warp reduce by shuffles only;
there is one barrier per row, before the label's scalar store.

Offsets are int64 (program ids and rows cast before any multiply by a stride). Loads are cast to fp32 at once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kdbench.kernels.front import KdLossInputError
from kdbench.kernels.kd_features import feature_row, feature_term
from kdbench.kernels.kd_loss_lean import (
    LN2, add2, chunk_stats, grad, grad_coefs, jsd_elems, label_grad, launch_parts, resident_programs, row_aligned,
    row_loss, soft_divergence,
)
# The front's backend interface (scale_rows_: grad *= grad_output, in place) and the input checks of every Triton
# launcher are the committed kernel's.
from kdbench.kernels.kd_loss_triton import check_inputs as _check_triton_inputs
from kdbench.kernels.kd_loss_triton import interpreting, scale_rows_  # noqa: F401

MAX_V = 8192  # wider rows go to the split-row kernel
INTERPRET_GRID = 3  # programs under the interpreter (it runs them one after another)


def num_warps_for(block: int) -> int:
    """1 warp up to 1024 columns, then 1 per 1024: 32 fp32 per lane for each of the row's live arrays."""
    return max(1, block // 1024)


# ----------------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _label(lab_ptr, row, N, ignore_index, HAS_LABELS: tl.constexpr):
    """(label, valid) of a row; a row past the end is not valid (its label is never read)."""
    in_range = row < N
    if HAS_LABELS:
        lab = tl.load(lab_ptr + tl.minimum(row, N - 1)).to(tl.int64)
        return lab, in_range & (lab != ignore_index)
    return tl.zeros_like(row), in_range


@triton.jit
def _load_row(s_ptr, s_stride_r, s_stride_v, t_ptr, t_stride_r, t_stride_v, row, N, V, lab, valid, cols,
              DO_SOFT: tl.constexpr, DO_CE: tl.constexpr):
    """s, t of a row as fp32 (-inf outside it, and everywhere on a row that is not valid: no memory traffic),
    and the label's two logits."""
    mask = cols < tl.where(valid, V, 0)
    safe = tl.minimum(row, N - 1)  # scalar loads stay in bounds for a row past the end
    s_row = s_ptr + safe * s_stride_r
    t_row = t_ptr + safe * t_stride_r
    s = tl.load(s_row + cols * s_stride_v, mask=mask, other=float("-inf")).to(tl.float32)
    t = s
    if DO_SOFT:
        t = tl.load(t_row + cols * t_stride_v, mask=mask, other=float("-inf")).to(tl.float32)
    col = tl.where(valid & (lab >= 0) & (lab < V), lab, 0)
    s_l = 0.0
    t_l = 0.0
    if DO_CE:
        s_l = tl.load(s_row + col * s_stride_v).to(tl.float32)
        if DO_SOFT:
            t_l = tl.load(t_row + col * t_stride_v).to(tl.float32)
    return s, t, s_l, t_l


@triton.jit
def _kd_loss_persistent_kernel(
    s_ptr, s_stride_r, s_stride_v,
    t_ptr, t_stride_r, t_stride_v,
    lab_ptr,  # (N,) int labels; unused without HAS_LABELS
    grad_ptr,  # (N, V) contiguous, student dtype; unused without WRITE_GRAD
    loss_ptr,  # (N,) fp32 row losses
    scale_ptr,  # (1,) fp32: 1 / n_valid for batchmean, else 1
    N, V, c, T, inv_T, alpha, beta, ignore_index,
    fs_ptr, fs_stride_r, fs_stride_h, ft_ptr, ft_stride_r, ft_stride_h, fgrad_ptr, sq_ptr, M, H, f_coef,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, DO_SOFT: tl.constexpr, DO_CE: tl.constexpr,
    SAME_T: tl.constexpr, T_POW: tl.constexpr, WRITE_GRAD: tl.constexpr, ROW_MULT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    HAS_FEATURES: tl.constexpr, WRITE_FGRAD: tl.constexpr, BLOCK_H: tl.constexpr,
):
    s_stride_r, t_stride_r, V = row_aligned(s_stride_r, t_stride_r, V, ROW_MULT)
    JSD_ROUND: tl.constexpr = DO_SOFT and DIVERGENCE == 2
    pid = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64)
    cols = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_V), BLOCK_V), BLOCK_V)
    scale = tl.load(scale_ptr)
    a_coef = scale * alpha * T
    b_coef = scale * (1.0 - alpha)

    # Prologue of the pipeline: the first row's logits, the second row's label.
    lab, valid = _label(lab_ptr, pid, N, ignore_index, HAS_LABELS)
    lab_n, valid_n = _label(lab_ptr, pid + step, N, ignore_index, HAS_LABELS)
    s, t, s_l, t_l = _load_row(s_ptr, s_stride_r, s_stride_v, t_ptr, t_stride_r, t_stride_v, pid, N, V, lab, valid,
                               cols, DO_SOFT, DO_CE)
    row = pid
    while row < N:  # (a while, not a range: the row stays an int64 tensor, also under the interpreter)
        # Issue the next row's loads (and the label after it) before this row's math.
        lab_nn, valid_nn = _label(lab_ptr, row + 2 * step, N, ignore_index, HAS_LABELS)
        s_n, t_n, s_ln, t_ln = _load_row(s_ptr, s_stride_r, s_stride_v, t_ptr, t_stride_r, t_stride_v, row + step,
                                         N, V, lab_n, valid_n, cols, DO_SOFT, DO_CE)

        mu_s, mu_t, mu_1, d_s, d_t, d_1, A, x1, x2, e_1 = chunk_stats(
            s, t, c, DIVERGENCE, DO_SOFT, DO_CE, SAME_T, T_POW)
        L_s = mu_s + tl.log2(d_s)
        L_t = mu_t + tl.log2(d_t)
        L_1 = mu_1 + tl.log2(d_1)
        D = soft_divergence(A, d_s, d_t, L_s, L_t, inv_T, DIVERGENCE)
        kl_sm = 0.0
        if JSD_ROUND:
            ps, u, part_s, part_t = jsd_elems(s, t, c, L_s, L_t, beta)
            sm, tm = tl.reduce((part_s, part_t), 0, add2)
            kl_sm = LN2 * sm
            D = beta * LN2 * tm + (1.0 - beta) * kl_sm
            x1 = ps
            x2 = u
        tl.store(loss_ptr + row, row_loss(D, L_t, L_1, s_l, alpha, T, valid, DO_SOFT, DO_CE))
        if WRITE_GRAD:
            A_s, A_t, A_1, P, Q = grad_coefs(mu_s, mu_t, mu_1, L_s, L_t, L_1, D, kl_sm, a_coef, b_coef, inv_T,
                                             beta, valid, DIVERGENCE, DO_SOFT, DO_CE, SAME_T)
            g = grad(x1, x2, e_1, A_s, A_t, A_1, P, Q, DIVERGENCE, DO_SOFT, DO_CE, SAME_T, T_POW)
            g_row = grad_ptr + row * V
            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < V)
            if DO_CE:
                g_l = label_grad(s_l, t_l, c, mu_s, mu_t, mu_1, L_s, L_t, beta, A_s, A_t, A_1, P, Q, b_coef,
                                 DIVERGENCE, DO_SOFT, DO_CE, SAME_T, T_POW)
                tl.debug_barrier()  # the vector store above lands first
                if valid & (lab >= 0) & (lab < V):
                    tl.store(g_row + lab, g_l.to(grad_ptr.dtype.element_ty))

        s = s_n
        t = t_n
        s_l = s_ln
        t_l = t_ln
        lab = lab_n
        valid = valid_n
        lab_n = lab_nn
        valid_n = valid_nn
        row += step

    if HAS_FEATURES:
        r = pid
        while r < M:
            feature_row(r, fs_ptr, fs_stride_r, fs_stride_h, ft_ptr, ft_stride_r, ft_stride_h, fgrad_ptr, sq_ptr,
                        H, f_coef, WRITE_FGRAD, BLOCK_H)
            r += step


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------


def check_inputs(s, t, features) -> None:
    """The front's hook: fp32/bf16/fp16 only, CPU tensors only under the interpreter, rows of at most MAX_V."""
    _check_triton_inputs(s, t, features, "persistent")
    if triton.next_power_of_2(s.shape[1]) > MAX_V:
        raise KdLossInputError(f"kd_loss (persistent): rows of {s.shape[1]} logits are over {MAX_V}; "
                               "KDBENCH_KERNEL=split takes them")


def launch_args(s, t, labels, opts, want_grad: bool, features=None, want_grad_f: bool = False, *,
                t_pow: bool = True):
    """(outputs, args, meta) of a launch of the persistent kernel on s, t (N, V <= MAX_V); the grid and the warps
    are the caller's. outputs = (rows (N,) fp32, grad (N, V) or None, scale (1,), feature arguments)."""
    n, v = s.shape
    outputs, head, scalars, tail, meta = launch_parts(s, t, labels, opts, want_grad, features, want_grad_f, t_pow)
    meta.update(BLOCK_V=triton.next_power_of_2(v))
    return outputs, (*head, n, v, *scalars, *tail), meta


def kd_loss_forward(s, t, labels, opts, want_grad: bool, features=None, want_grad_f: bool = False, *,
                    num_warps: int | None = None, t_pow: bool = True, maxnreg: int | None = None):
    """The persistent kernel on s, t (N, V <= MAX_V) and features (fs, ft) (M, H), as the old launcher: returns
    (row losses (N,) fp32, grad (N, V) or None, scale (0-d), feature part or None). grad is d loss / d s for
    grad_output = 1 (the reduction's 1 / n_valid included); the autograd Function scales it.
    maxnreg: a register cap for ptxas (GPU only). At 1 warp and V = 1000 fp32, ptxas alone picks 168 registers and
    spills 8 bytes; capped at 232 it takes 165 and spills none (Triton 3.9's ptxas). A benchmark candidate."""
    check_inputs(s, t, features)
    n, v = s.shape
    (rows, grad, scale, fargs), args, meta = launch_args(s, t, labels, opts, want_grad, features, want_grad_f,
                                                         t_pow=t_pow)
    m = fargs.get("M", 0)
    if n + m == 0:
        return rows, grad, scale[0], feature_term(fargs, opts, features)
    warps = num_warps or num_warps_for(meta["BLOCK_V"])
    options = {"num_warps": warps}
    if maxnreg and not interpreting():
        options["maxnreg"] = maxnreg
    if interpreting():
        grid = INTERPRET_GRID
    else:
        grid = resident_programs(_kd_loss_persistent_kernel, s.device, args, meta, options)
    grid = max(1, min(grid, max(n, m)))
    _kd_loss_persistent_kernel[(grid,)](*args, **options, **meta)
    return rows, grad, scale[0], feature_term(fargs, opts, features)
