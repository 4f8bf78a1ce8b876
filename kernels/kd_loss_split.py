"""kd_loss for large vocabularies: a split-row kernel that reads the logits once (UNTIMED; opt-in, see TUNING.md).

Math and bytes (b = bytes per logit; the element math is kernels/kd_loss_lean.py's top comment)
------------------------------------------------------------------------------------------------------------
Each row of V logits is cut into C = cdiv(V, CHUNK) chunks, a ticket (row, chunk) each, CHUNK elements (8192 for
forward KL, 4096 for the others: see CHUNKS) held in registers by one program of 4 warps:
    1. load s and t of the chunk (2 b CHUNK), its maxima and (d_s, d_t, d_1, A): 2 MUFU per element at T = 2..4
       (e_1 = e_s ** T), 3 otherwise, 2 at T = 1;
    2. publish those 7 numbers to a workspace (N, 9, C) fp32 and count the row's arrivals (one atomic per chunk);
    3. wait until the row's C chunks have arrived, merge the C statistics (the row's log-sum-exps and D);
       jsd: a second round, since KL(p_s || m) needs log m from the finished log-sum-exps;
    4. write the chunk's gradient from the exps it still holds (b CHUNK; no exp again), the one-hot term as one
       scalar store at the label; chunk 0 writes the row's loss.
Bytes: 3 b N V (the minimum: read s and t once, write the gradient once), plus per row 28 C bytes of statistics
written and 28 C^2 read back from L2 (C = 16 at V = 128256: 7 KB against a row's 770 KB of bf16 traffic). Ignored rows read nothing (their loads are masked off) and write zeros.

Co-residency. A program waits only on chunks of its own row, and it publishes its chunk before it waits. It takes
its next ticket only after it is done with the current one, so it never holds an unpublished ticket while it
waits. Tickets come from one atomic counter in row-major order, and only a running program takes one. So every
row below the row of the highest ticket taken has all its tickets taken and published, and it completes. The
programs waiting on that last row hold distinct tickets of it, so there are fewer than C of them. With at least C
programs resident, some program is not waiting: it finishes and takes the row's missing tickets. The launcher
sizes a persistent grid to the SMs times the programs each SM holds (from the compiled kernel's registers and
shared memory). Where that is under C, it runs the multi-launch mode below instead.

Multi-launch mode (PHASE > 0). Under TRITON_INTERPRET=1 programs run one after another, so a spin-wait never
ends. The same kernel then runs as two launches (three for jsd): PHASE 1 computes and publishes the statistics,
PHASE 2 (jsd) the second round, PHASE 3 reloads its chunk and writes the loss and the gradient. A launch boundary
replaces each wait; the code paths are the ones of the single launch. It moves 5 b N V (7 for jsd).

Offsets are int64 (row = ticket // C, cast before any multiply by a stride). Loads are cast to fp32 at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdbench.kernels.kd_features import feature_row, feature_term
from kdbench.kernels.kd_loss_lean import (
    ACC, D_1, D_S, D_T, JSD, KL_SM, KL_TM, LN2, MU_1, MU_S, MU_T, NEG_BIG, N_STATS, add2, chunk_stats, grad,
    grad_coefs, jsd_elems, label_grad, launch_parts, row_aligned, merge, resident_programs, row_loss, soft_divergence,
)
# The front's backend interface (scale_rows_: grad *= grad_output, in place) and the input checks of every Triton
# launcher are the committed kernel's.
from kdbench.kernels.kd_loss_triton import check_inputs as _check_triton_inputs
from kdbench.kernels.kd_loss_triton import interpreting, scale_rows_  # noqa: F401

# Elements per program on a GPU, by divergence, at 4 warps: forward KL keeps 2 fp32 arrays (e_s, e_t) of 64 per
# thread in 168-170 registers, no spills (sm_90, cuobjdump -res-usage); reverse KL at 8192 needs 245 and jsd
# spills (128 bytes of stack), so they hold 4096 (32 per thread: 128 and 192 registers, no spills).
CHUNKS = {"forward_kl": 8192, "reverse_kl": 4096, "jsd": 4096}
NUM_WARPS = 4
INTERPRET_GRID = 3  # programs under the interpreter (it runs them one after another)


# ----------------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _wait(cnt_ptr, target):
    """Spin until the row's arrival counter reaches target (acquire: the statistics published before each
    arrival are visible after it)."""
    n = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    while n < target:
        n = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def _load_stat(ws_row, k, C, ks, kmask, other):
    """Slot k of every chunk of a row, [CMAX], from L2 (.cg: never a line this SM cached before it was written)."""
    return tl.load(ws_row + k * C + ks, mask=kmask, other=other, cache_modifier=".cg")


@triton.jit
def _kd_loss_split_kernel(
    s_ptr, s_stride_r, s_stride_v,
    t_ptr, t_stride_r, t_stride_v,
    lab_ptr,  # (N,) int labels; unused without HAS_LABELS
    grad_ptr,  # (N, V) contiguous, student dtype; unused without WRITE_GRAD
    loss_ptr,  # (N,) fp32 row losses
    scale_ptr,  # (1,) fp32: 1 / n_valid for batchmean, else 1
    ws_ptr,  # (N, N_STATS, C) fp32 chunk statistics
    sync_ptr,  # (N + 4,) int32 zeros: the rows' arrival counters, then one ticket counter per PHASE
    N, V, C, c, T, inv_T, alpha, beta, ignore_index,
    fs_ptr, fs_stride_r, fs_stride_h, ft_ptr, ft_stride_r, ft_stride_h, fgrad_ptr, sq_ptr, M, H, f_coef,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, DO_SOFT: tl.constexpr, DO_CE: tl.constexpr,
    SAME_T: tl.constexpr, T_POW: tl.constexpr, WRITE_GRAD: tl.constexpr, ROW_MULT: tl.constexpr,
    PHASE: tl.constexpr,  # 0: one launch with waits; 1, 2 (jsd), 3: the multi-launch mode's launches
    CHUNK: tl.constexpr, CMAX: tl.constexpr,  # CMAX = next_pow2(C)
    HAS_FEATURES: tl.constexpr, WRITE_FGRAD: tl.constexpr, BLOCK_H: tl.constexpr,
):
    s_stride_r, t_stride_r, V = row_aligned(s_stride_r, t_stride_r, V, ROW_MULT)
    JSD_ROUND: tl.constexpr = DO_SOFT and DIVERGENCE == 2
    LAST: tl.constexpr = PHASE == 0 or PHASE == 3  # the launch that writes the loss and the gradient
    total = N * C
    tk_ptr = sync_ptr + N + PHASE
    lanes = tl.arange(0, CHUNK)
    ks = tl.arange(0, CMAX)
    kmask = ks < C
    scale = tl.load(scale_ptr)
    b_coef = scale * (1.0 - alpha)
    a_coef = scale * alpha * T

    # A program takes its next ticket only when it is done with the current one: a ticket taken early and held
    # through a wait could be the next chunk of the same row, which the program would then wait for itself.
    ticket = tl.atomic_add(tk_ptr, 1)
    while ticket < total:
        row = (ticket // C).to(tl.int64)
        lab = tl.load(lab_ptr + row).to(tl.int64) if HAS_LABELS else 0
        chunk = ticket % C
        valid = (lab != ignore_index) if HAS_LABELS else row >= 0
        cols = tl.max_contiguous(tl.multiple_of(chunk * CHUNK + lanes, CHUNK), CHUNK)
        mask = cols < tl.where(valid, V, 0)  # an ignored row: no memory traffic
        s_row = s_ptr + row * s_stride_r
        t_row = t_ptr + row * t_stride_r
        s = tl.load(s_row + cols * s_stride_v, mask=mask, other=float("-inf")).to(tl.float32)
        t = s
        if DO_SOFT:
            t = tl.load(t_row + cols * t_stride_v, mask=mask, other=float("-inf")).to(tl.float32)
        mu_s, mu_t, mu_1, d_s, d_t, d_1, acc, x1, x2, e_1 = chunk_stats(
            s, t, c, DIVERGENCE, DO_SOFT, DO_CE, SAME_T, T_POW)
        ws_row = ws_ptr + row * (N_STATS * C)
        cnt_ptr = sync_ptr + row
        if PHASE <= 1:
            tl.store(ws_row + MU_S * C + chunk, mu_s)
            tl.store(ws_row + MU_T * C + chunk, mu_t)
            tl.store(ws_row + MU_1 * C + chunk, mu_1)
            tl.store(ws_row + D_S * C + chunk, d_s)
            tl.store(ws_row + D_T * C + chunk, d_t)
            tl.store(ws_row + D_1 * C + chunk, d_1)
            tl.store(ws_row + ACC * C + chunk, acc)
            if PHASE == 0:
                tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")  # Triton puts a barrier before it
        # A chunk needs the row's statistics for its gradient; without one, chunk 0 still needs them for the loss,
        # and jsd needs every chunk's share of the second round.
        if PHASE != 1:
            need = (chunk == 0) | WRITE_GRAD | JSD_ROUND
            if need:
                if PHASE == 0:
                    _wait(cnt_ptr, C)
                M_s, M_t, M_1, dd_s, dd_t, dd_1, A = merge(
                    _load_stat(ws_row, MU_S, C, ks, kmask, NEG_BIG), _load_stat(ws_row, MU_T, C, ks, kmask, NEG_BIG),
                    _load_stat(ws_row, MU_1, C, ks, kmask, NEG_BIG), _load_stat(ws_row, D_S, C, ks, kmask, 0.0),
                    _load_stat(ws_row, D_T, C, ks, kmask, 0.0), _load_stat(ws_row, D_1, C, ks, kmask, 0.0),
                    _load_stat(ws_row, ACC, C, ks, kmask, 0.0), kmask, DIVERGENCE)
                L_s = M_s + tl.log2(dd_s)
                L_t = M_t + tl.log2(dd_t)
                L_1 = M_1 + tl.log2(dd_1)
                D = soft_divergence(A, dd_s, dd_t, L_s, L_t, inv_T, DIVERGENCE)
                kl_sm = 0.0
                if JSD_ROUND:
                    ps, u, part_s, part_t = jsd_elems(s, t, c, L_s, L_t, beta)
                    x1 = ps
                    x2 = u
                    if PHASE == 0 or PHASE == 2:
                        sm, tm = tl.reduce((part_s, part_t), 0, add2)
                        tl.store(ws_row + KL_TM * C + chunk, tm)
                        tl.store(ws_row + KL_SM * C + chunk, sm)
                        if PHASE == 0:
                            tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")
                            if (chunk == 0) | WRITE_GRAD:
                                _wait(cnt_ptr, 2 * C)
                    if LAST:
                        kl_sm = LN2 * tl.sum(_load_stat(ws_row, KL_SM, C, ks, kmask, 0.0), 0)
                        kl_tm = LN2 * tl.sum(_load_stat(ws_row, KL_TM, C, ks, kmask, 0.0), 0)
                        D = beta * kl_tm + (1.0 - beta) * kl_sm
                if LAST:
                    lab_ok = valid & (lab >= 0) & (lab < V)
                    lab_col = tl.where(lab_ok, lab, 0)
                    if chunk == 0:
                        s_lab = tl.load(s_row + lab_col * s_stride_v).to(tl.float32) if DO_CE else 0.0
                        tl.store(loss_ptr + row, row_loss(D, L_t, L_1, s_lab, alpha, T, valid, DO_SOFT, DO_CE))
                    if WRITE_GRAD:
                        A_s, A_t, A_1, P, Q = grad_coefs(mu_s, mu_t, mu_1, L_s, L_t, L_1, D, kl_sm, a_coef, b_coef,
                                                         inv_T, beta, valid, DIVERGENCE, DO_SOFT, DO_CE, SAME_T)
                        g = grad(x1, x2, e_1, A_s, A_t, A_1, P, Q, DIVERGENCE, DO_SOFT, DO_CE, SAME_T, T_POW)
                        g_row = grad_ptr + row * V
                        tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < V)
                        if DO_CE:
                            if lab_ok & (lab_col // CHUNK == chunk):
                                s_l = tl.load(s_row + lab_col * s_stride_v).to(tl.float32)
                                t_l = tl.load(t_row + lab_col * t_stride_v).to(tl.float32) if DO_SOFT else s_l
                                g_l = label_grad(s_l, t_l, c, mu_s, mu_t, mu_1, L_s, L_t, beta, A_s, A_t, A_1, P, Q,
                                                 b_coef, DIVERGENCE, DO_SOFT, DO_CE, SAME_T, T_POW)
                                tl.debug_barrier()  # the vector store above lands first
                                tl.store(g_row + lab_col, g_l.to(grad_ptr.dtype.element_ty))
        ticket = tl.atomic_add(tk_ptr, 1)

    if HAS_FEATURES and LAST:
        r = tl.program_id(0).to(tl.int64)
        while r < M:
            feature_row(r, fs_ptr, fs_stride_r, fs_stride_h, ft_ptr, ft_stride_r, ft_stride_h, fgrad_ptr, sq_ptr,
                        H, f_coef, WRITE_FGRAD, BLOCK_H)
            r += tl.num_programs(0)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------


def check_inputs(s, t, features) -> None:
    """The front's hook: fp32/bf16/fp16 only, CPU tensors only under the interpreter."""
    _check_triton_inputs(s, t, features, "split")


def launch_args(s, t, labels, opts, want_grad: bool, features=None, want_grad_f: bool = False, *,
                chunk: int | None = None, t_pow: bool = True):
    """(outputs, args, meta) of one launch of the split kernel on s, t (N, V); PHASE and the grid are the
    caller's. outputs = (rows (N,) fp32, grad (N, V) or None, scale (1,), ws, sync, feature arguments)."""
    n, v = s.shape
    chunk = chunk or CHUNKS[opts["divergence"]]
    n_chunks = triton.cdiv(v, chunk)
    (rows, grad, scale, fargs), head, scalars, tail, meta = launch_parts(s, t, labels, opts, want_grad, features,
                                                                         want_grad_f, t_pow)
    ws = torch.empty((n, N_STATS.value, n_chunks), dtype=torch.float32, device=s.device)
    sync = torch.zeros(n + 4, dtype=torch.int32, device=s.device)
    meta.update(CHUNK=chunk, CMAX=triton.next_power_of_2(n_chunks))
    return (rows, grad, scale, ws, sync, fargs), (*head, ws, sync, n, v, n_chunks, *scalars, *tail), meta


def kd_loss_forward(s, t, labels, opts, want_grad: bool, features=None, want_grad_f: bool = False, *,
                    chunk: int | None = None, two_launch: bool | None = None, t_pow: bool = True):
    """The split-row kernel on s, t (N, V) and features (fs, ft) (M, H), as the tiled kernel's launcher: returns
    (row losses (N,) fp32, grad (N, V) or None, scale (0-d), feature part or None). grad is d loss / d s for
    grad_output = 1 (the reduction's 1 / n_valid included); the autograd Function scales it.
    two_launch: None picks the single launch with waits on a GPU where C programs fit at once, else launches."""
    check_inputs(s, t, features)
    n = s.shape[0]
    outputs, args, meta = launch_args(s, t, labels, opts, want_grad, features, want_grad_f, chunk=chunk,
                                      t_pow=t_pow)
    rows, grad, scale, ws, sync, fargs = outputs
    m = fargs.get("M", 0)
    if n + m == 0:
        return rows, grad, scale[0], feature_term(fargs, opts, features)
    n_chunks = args[14]
    warps = NUM_WARPS if not interpreting() else 1
    if interpreting():
        grid, resident = INTERPRET_GRID, 1  # one program at a time
    else:
        resident = resident_programs(_kd_loss_split_kernel, s.device, args, dict(meta, PHASE=0), {"num_warps": warps})
        grid = max(1, min(resident, n * n_chunks + m))
    if two_launch is None:
        two_launch = resident < n_chunks  # always under the interpreter
    if two_launch:
        phases = (1, 2, 3) if meta["DO_SOFT"] and meta["DIVERGENCE"] == JSD else (1, 3)
    else:
        if resident < n_chunks:
            raise ValueError(f"kd_loss (split): {n_chunks} chunks per row but only {resident} programs fit at once")
        phases = (0,)
    for phase in phases:
        _kd_loss_split_kernel[(grid,)](*args, PHASE=phase, num_warps=warps, **meta)
    return rows, grad, scale[0], feature_term(fargs, opts, features)
