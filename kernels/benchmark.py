"""Kernel benchmark: kd_loss forward + backward against eager PyTorch, torch.compile and Liger-Kernel.

`bench_kernels()` returns a markdown table and writes it to results/kernels/<device-slug>.md (`kdbench bench
kernels`). On the CPU it runs smaller shapes and the kd_loss row is the PyTorch reference. Heavy imports happen
inside.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kdbench.kernels.bench_common import bench_page, cuda_peak_extra_mib, device_slug, median_ms, triton_version

log = logging.getLogger(__name__)

# (rows, vocab, dtype): a classifier-sized vocab, Llama-2 (32000) and Llama-3 (128256).
# The two shapes with targets (issue 3) first: the table is written after each shape, so a call that runs out of
# time loses the last ones.
GPU_SHAPES = [
    (8192, 128256, "bfloat16"),
    (65536, 1000, "float32"),
    (8192, 32000, "bfloat16"),
    (8192, 128256, "float32"),
    (8192, 50257, "bfloat16"),  # GPT-2's odd vocabulary: rows that start off a 16-byte boundary
]
# Same vocabularies with rows cut so that eager PyTorch on a 2-core CPU takes seconds, not minutes.
CPU_SHAPES = [(2048, 1000, "float32"), (128, 32000, "bfloat16"), (32, 128256, "bfloat16"), (32, 128256, "float32")]
CPU_QUICK_SHAPES = [(256, 1000, "float32"), (16, 32000, "bfloat16")]

TEMPERATURE, ALPHA = 2.0, 0.5  # forward KL, every row valid: all implementations compute the same number
SAMPLE_ROWS = 64  # gradient rows checked against float64 (first and last SAMPLE_ROWS // 2)


# ----------------------------------------------------------------------------------------------------------------
# The implementations
# ----------------------------------------------------------------------------------------------------------------


def eager_kd_loss(s, t, labels, temperature: float = TEMPERATURE, alpha: float = ALPHA):
    """Plain PyTorch: log_softmax + kl_div + cross_entropy in fp32, as a training script would write it."""
    import torch.nn.functional as F

    T = temperature
    log_ps = F.log_softmax(s.float() / T, dim=-1)
    log_pt = F.log_softmax(t.float() / T, dim=-1)
    soft = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    hard = F.cross_entropy(s.float(), labels)
    return alpha * T * T * soft + (1.0 - alpha) * hard


def _ours(s, t, labels):
    from kdbench.kernels import kd_loss

    return kd_loss(s, t, labels, temperature=TEMPERATURE, alpha=ALPHA)


def _kernel_module():
    """kernels/kd_loss_triton.py, whose module settings the candidates change."""
    import importlib

    return importlib.import_module("kdbench.kernels.kd_loss_triton")


def kernel_settings(**settings):
    """kernels/kd_loss_triton.py's module settings changed inside a `with` block, put back after it (a misspelt
    setting is an AttributeError)."""
    import contextlib
    from unittest import mock

    return mock.patch.multiple(_kernel_module(), **settings) if settings else contextlib.nullcontext()


def _ours_with(**settings):
    """kd_loss with some of kernels/kd_loss_triton.py's module settings changed for the call: a candidate timed
    beside the default in the same run, which decides whether it becomes the default."""

    def fn(s, t, labels):
        with kernel_settings(**settings):
            return _ours(s, t, labels)

    return fn


def _precompile(settings_list: list[dict], s, t, labels) -> None:
    """Compile every autotune config of the tiled kernel under each of `settings_list` for this shape, in parallel
    (Triton's AsyncCompileMode over a thread pool), before the timings: the autotuner would compile them one after
    another at each first launch. A failure here costs nothing but its time: the autotuner compiles what is
    missing, and reports what does not compile."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import triton

    thunks = []
    for settings in settings_list:
        with kernel_settings(**settings):
            thunks += _kernel_module().precompile_tiled(s, t, labels, temperature=TEMPERATURE, alpha=ALPHA)
    if not thunks:
        return
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(len(thunks), os.cpu_count() or 1)) as pool, \
            triton.AsyncCompileMode(pool, ignore_errors=True):
        for thunk in thunks:
            try:
                thunk()  # submits the compile to the pool; the mode waits for all of them on exit
            except Exception as exc:
                log.warning("kd_loss bench: precompiling failed: %s", exc)
    log.info("kd_loss bench: compiled %d kernels in %.1f s", len(thunks), time.perf_counter() - start)


def _whole_rows(v: int) -> bool:
    return v <= _kernel_module().MAX_FUSED_V  # (a power of 2) the kernel's single-read path


@dataclass(frozen=True)
class Candidate:
    """A setting of kernels/kd_loss_triton.py timed as its own row beside the default (kernels/TUNING.md); the same
    run decides whether it becomes the default. `applies(V)`: the shapes where it changes the kernel at all."""

    name: str
    settings: dict
    what: str
    applies: Callable[[int], bool] = lambda v: True


CANDIDATES = [
    Candidate("kd_loss (triton, whole rows at 1 warp)", {"SINGLE_WARPS": 1},
              "a row that fits in registers at 1 warp instead of 4 (at V = 1000): its reductions need no barrier",
              _whole_rows),
    Candidate("kd_loss (triton, whole rows at 2 warps)", {"SINGLE_WARPS": 2}, "the same at 2 warps", _whole_rows),
]


def _liger():
    """Liger-Kernel's KL-div and cross-entropy (log-softmax stays in PyTorch: its KL takes log-probs), or None."""
    try:
        import torch.nn.functional as F
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError:
        return None
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    ce = LigerCrossEntropyLoss()

    def fn(s, t, labels):
        T = TEMPERATURE
        log_ps = F.log_softmax(s.float() / T, dim=-1)
        log_pt = F.log_softmax(t.float() / T, dim=-1)
        return ALPHA * T * T * kl(log_ps, log_pt) + (1.0 - ALPHA) * ce(s, labels)

    return fn


# ----------------------------------------------------------------------------------------------------------------
# The float64 check
# ----------------------------------------------------------------------------------------------------------------


def kd_loss_float64_rows(s, t, labels, temperature: float = TEMPERATURE, alpha: float = ALPHA):
    """Per-row forward-KL distillation losses (n,) in float64, naive formulas (autograd-able). s, t: (n, V)."""
    import torch
    import torch.nn.functional as F

    T = temperature
    s64, t64 = s.double(), t.double()
    ls, lt = torch.log_softmax(s64 / T, -1), torch.log_softmax(t64 / T, -1)
    pt = lt.exp()
    kl = (pt * torch.where(pt > 0, lt - ls, torch.zeros((), dtype=ls.dtype))).sum(-1)
    ce = F.cross_entropy(s64, labels, reduction="none")
    return alpha * T * T * kl + (1.0 - alpha) * ce


def float64_check(s, t, labels, loss, grad, chunk_elems: int = 1 << 25):
    """Max relative error of (loss, grad) against float64, batchmean over all rows.

    The loss is checked whole (float64 in row chunks on the inputs' device); the gradient on SAMPLE_ROWS rows,
    relative to its largest element there. Returns max(loss error, gradient error).
    """
    import torch

    n, v = s.shape
    step = max(1, chunk_elems // v)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, step):
            total += float(kd_loss_float64_rows(s[i : i + step], t[i : i + step], labels[i : i + step]).sum())
    exp_loss = total / n
    loss_err = abs(float(loss) - exp_loss) / max(abs(exp_loss), 1e-30)
    half = max(1, SAMPLE_ROWS // 2)
    rows = torch.unique(torch.cat([torch.arange(min(half, n)), torch.arange(max(0, n - half), n)])).to(s.device)
    s_rows = s.detach()[rows].double().requires_grad_()
    (kd_loss_float64_rows(s_rows, t[rows], labels[rows]).sum() / n).backward()
    g64 = s_rows.grad
    grad_err = float((grad[rows].double() - g64).abs().max()) / max(float(g64.abs().max()), 1e-30)
    return max(loss_err, grad_err)


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def _time_ms(step, s, cuda: bool, quick: bool) -> float:
    """Median milliseconds of step() (forward + backward), s.grad cleared before each run."""
    return median_ms(step, cuda, warmup=10 if quick else 25, rep=40 if quick else 200, cpu_runs=3 if quick else 7,
                     grad_to_none=[s])


def _copy_gbps(n: int, v: int, dtype, device: str, quick: bool) -> float:
    """Measured copy bandwidth (bytes read + written per second, GB/s) for an (n, v) tensor."""
    import torch

    src = torch.randn(n, v, device=device).to(dtype)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()
    ms = median_ms(lambda: dst.copy_(src), device == "cuda", warmup=10, rep=50 if quick else 200,
                   cpu_runs=3 if quick else 9)
    return nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------


def bench_kernels(out_dir: Path | None = None, shapes=None, quick: bool = False,
                  out_file: Path | None = None) -> tuple[str, Path]:
    """Time kd_loss forward+backward against eager, torch.compile and Liger; return (markdown table, its file).

    out_dir: where <device-slug>.md (or cpu.md) is written; default results/kernels under the current directory.
    out_file: the file to write instead.
    shapes: [(rows, vocab, dtype name), ...]; default GPU_SHAPES on CUDA, CPU_SHAPES (CPU_QUICK_SHAPES) on CPU.
    quick: fewer repetitions; on the CPU also smaller shapes and no torch.compile (its C++ build takes minutes).
    """
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if shapes is None:
        shapes = GPU_SHAPES if cuda else (CPU_QUICK_SHAPES if quick else CPU_SHAPES)
    dev_name = torch.cuda.get_device_name() if cuda else "CPU"
    slug = device_slug(dev_name) if cuda else "cpu"

    impls = [("eager", eager_kd_loss)]
    if cuda or not quick:
        impls.append(("torch.compile", torch.compile(eager_kd_loss, dynamic=False)))
    liger = _liger() if cuda else None
    if liger is not None:
        impls.append(("liger", liger))
    ours_name = "kd_loss (triton)" if cuda else "kd_loss (reference)"
    impls.append((ours_name, _ours))
    applies = {}  # candidate row name -> the shapes it is timed on
    if cuda:
        for cand in CANDIDATES:
            impls.append((cand.name, _ours_with(**cand.settings)))
            applies[cand.name] = cand.applies

    out_file = bench_page(out_file, Path("results") / "kernels" if out_dir is None else Path(out_dir), slug)
    rows = []
    for k, (n, v, dtype_name) in enumerate(shapes, 1):
        dtype = getattr(torch, dtype_name)
        log.info("kd_loss bench: shape %d of %d, %d x %d %s", k, len(shapes), n, v, dtype_name)
        copy_gbps = _copy_gbps(n, v, dtype, device, quick)
        min_bytes = 3 * n * v * torch.empty((), dtype=dtype).element_size()  # read s, t; write grad
        g = torch.Generator(device=device).manual_seed(0)
        if cuda:  # the default and the candidates timed on this shape, compiled in parallel first
            s = torch.randn(n, v, device=device, generator=g).to(dtype)
            _precompile([{}] + [c.settings for c in CANDIDATES if c.applies(v)], s, s, torch.zeros(n, dtype=torch.long,
                        device=device))
            del s
            g = torch.Generator(device=device).manual_seed(0)
        for name, fn in impls:
            if name in applies and not applies[name](v):
                continue
            step = s = t = labels = s_run = loss = None
            cells = dict(shape=f"{n} x {v}", dtype=dtype_name, impl=name)
            try:
                s = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype).requires_grad_()
                t = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype)
                labels = torch.randint(0, v, (n,), device=device, generator=g)
                # Liger's cross-entropy writes its gradient into the logits: it gets a copy to ruin, and the
                # error check uses the pristine inputs.
                s_run = s.detach().clone().requires_grad_() if name == "liger" else s

                def step(s_run=s_run, t=t, labels=labels, fn=fn):
                    fn(s_run, t, labels).backward()

                loss = fn(s_run, t, labels)
                loss.backward()
                err = float64_check(s, t, labels, loss.detach(), s_run.grad)
                s_run.grad = None
                ms = _time_ms(step, s_run, cuda, quick)
                log.info("  %s: %.4g ms", name, ms)
                gbps = min_bytes / (ms * 1e-3) / 1e9
                cells.update(
                    ms=f"{ms:.4g}",
                    gbps=f"{gbps:.4g}",
                    frac=f"{gbps / copy_gbps:.2f}",
                    mem=f"{cuda_peak_extra_mib(step, s_run):.0f}" if cuda else "n/a",
                    err=f"{err:.1e}",
                )
            except Exception as exc:  # one failing implementation (OOM, no compiler) must not sink the table
                log.warning("kd_loss bench: %s failed on %d x %d %s: %s", name, n, v, dtype_name, exc)
                msg = "OOM" if "out of memory" in str(exc).lower() else f"failed: {type(exc).__name__}"
                cells.update(ms=msg, gbps="", frac="", mem="", err="")
            finally:
                step = s = t = labels = s_run = loss = None  # step's defaults hold the tensors too
                if cuda:
                    torch.cuda.empty_cache()
            rows.append(cells)
        rows.append(
            dict(shape=f"{n} x {v}", dtype=dtype_name, impl="(copy, for scale)", gbps=f"{copy_gbps:.4g}", frac="1.00")
        )
        # after each shape, so that a run cut off by a time limit keeps what it measured
        out_file.write_text(_markdown(rows, dev_name, cuda, quick, liger is not None))

    table = _markdown(rows, dev_name, cuda, quick, liger is not None)
    out_file.write_text(table)
    return table, out_file


def _markdown(rows, dev_name: str, cuda: bool, quick: bool, has_liger: bool) -> str:
    import torch

    cols = [
        ("shape", "shape (N x V)"),
        ("dtype", "dtype"),
        ("impl", "implementation"),
        ("ms", "median ms"),
        ("gbps", "GB/s (3 N V bytes)"),
        ("frac", "of copy BW"),
        ("mem", "peak extra MiB"),
        ("err", "max rel err vs fp64"),
    ]
    when = datetime.date.today().isoformat()
    lines = [f"# kd_loss forward + backward on {dev_name}", ""]
    if not cuda:
        lines += [
            "**CPU run: small shapes (rows cut from the GPU table's 65536/8192), and the kd_loss row is the PyTorch "
            "reference, not the Triton kernel; no Liger.**" + (" Quick mode: no torch.compile." if quick else ""),
            "",
        ]
    lines += [
        f"Made by `kdbench bench kernels{' --quick' if quick else ''}` on {when}; torch {torch.__version__}, "
        f"triton {triton_version()}" + ("." if cuda else f"; {torch.get_num_threads()} torch CPU threads."),
        f"Loss: alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE, T = {TEMPERATURE}, alpha = {ALPHA}, batchmean, every "
        "row valid; forward and backward of the student logits (teacher frozen).",
        *(["Liger-Kernel is not installed here: no liger rows."] if cuda and not has_liger else []),
        *(["Candidates for the default, timed in the same run (kernels/TUNING.md): "
           + "; ".join(f"`{c.name}`: {c.what}" for c in CANDIDATES) + "."] if cuda else []),
        "Time: " + ("triton.testing.do_bench median (CUDA events, L2 flushed between runs)." if cuda else
                    "median of time.perf_counter over repeated runs."),
        "GB/s counts the minimal traffic, read student + teacher and write the gradient once (3 N V bytes in the "
        "input dtype); 'of copy BW' divides it by a measured device copy of one N x V tensor (bytes read + written).",
        ("Peak extra: torch.cuda.max_memory_allocated during one step minus the inputs, gradient included. "
         if cuda else "") + f"Error: max of the loss's relative error (float64 over all rows) and the gradient's "
        f"max abs error over its max abs value, on {SAMPLE_ROWS} rows.",
        "",
        "| " + " | ".join(h for _, h in cols) + " |",
        "|" + "|".join("---" if k in ("shape", "dtype", "impl") else "---:" for k, _ in cols) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m kdbench.kernels.benchmark [--quick]
    import sys

    logging.basicConfig(level=logging.INFO)
    print(bench_kernels(quick="--quick" in sys.argv)[0])
