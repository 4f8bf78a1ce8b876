"""Benchmark: a language model's distillation loss from its last hidden states, with the output layers unfused
(both models' logits, then kd_loss) against fused_linear_kd_loss (chunks of logits, never all of them).

`bench_fused_linear()` returns a markdown table and writes it to results/fused-linear/<device-slug>.md: median
time of forward + backward and the peak memory above the inputs, for each implementation on the same inputs, and
how far the fused loss and gradients are from the unfused ones. On a GPU: triton.testing.do_bench and
torch.cuda.max_memory_allocated. On the CPU: a median of perf_counter, and the rise of the process's peak
resident memory (VmHWM) during one step, which sees every large tensor (they are mmap'ed and returned when freed).
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

from kdbench.kernels.bench_common import (bench_page, cpu_peak_extra_mib, cuda_peak_extra_mib, device_slug, median_ms,
                                          triton_version)

log = logging.getLogger(__name__)

# (tokens N, student hidden H, teacher hidden Ht, vocab V, dtype): GPT-2 small from GPT-2 XL, and Llama 3.2 1B
# from Llama 3 8B (one 8192-token batch).
GPU_SHAPES = [(8192, 768, 1600, 50257, "bfloat16"), (8192, 2048, 4096, 128256, "bfloat16")]
CPU_SHAPES = [(1024, 768, 1600, 50257, "float32")]
CPU_QUICK_SHAPES = [(64, 64, 96, 8192, "float32")]
TEMPERATURE, ALPHA = 2.0, 0.5


def _unfused(hs, ws, ht, wt, labels):
    import torch
    import torch.nn.functional as F

    from kdbench.kernels import kd_loss

    with torch.no_grad():  # the frozen teacher, as the Distiller runs it
        t = F.linear(ht, wt)
    return kd_loss(F.linear(hs, ws), t, labels, temperature=TEMPERATURE, alpha=ALPHA)


def _fused(hs, ws, ht, wt, labels):
    from kdbench.kernels import fused_linear_kd_loss

    return fused_linear_kd_loss(hs, ws, ht, wt, labels, temperature=TEMPERATURE, alpha=ALPHA)


IMPLEMENTATIONS = [("unfused: F.linear, then kd_loss", _unfused), ("fused_linear_kd_loss", _fused)]


def _peak_extra_mib(step, cuda: bool, *leaves) -> float:
    """Peak memory of one step above what was held before it, with the `leaves`' gradients dropped first (else
    the baseline holds a weight gradient that the step frees and allocates again)."""
    return cuda_peak_extra_mib(step, *leaves) if cuda else cpu_peak_extra_mib(step, *leaves)


def _median_ms(step, cuda: bool, quick: bool) -> float:
    return median_ms(step, cuda, warmup=5 if quick else 10, rep=50 if quick else 200, cpu_runs=3 if quick else 5)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def bench_fused_linear(out_dir: Path | None = None, shapes=None, quick: bool = False,
                       out_file: Path | None = None) -> tuple[str, Path]:
    """Time and measure both implementations on each shape; write the markdown table to `out_file` (default
    <out_dir>/<device>.md) and return (table, file)."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shapes = shapes or (GPU_SHAPES if cuda else (CPU_QUICK_SHAPES if quick else CPU_SHAPES))
    dev_name = torch.cuda.get_device_name() if cuda else "CPU"
    out_file = bench_page(out_file, Path("results") / "fused-linear" if out_dir is None else Path(out_dir),
                          device_slug(dev_name) if cuda else "cpu")
    rows = []
    for k, (n, h, ht, v, dtype_name) in enumerate(shapes, 1):
        log.info("fused-linear bench: shape %d of %d, %d x %d (teacher %d) -> %d %s", k, len(shapes), n, h, ht, v,
                 dtype_name)
        dtype = getattr(torch, dtype_name)
        g = torch.Generator(device=device).manual_seed(0)
        hs = torch.randn(n, h, device=device, generator=g).to(dtype).requires_grad_()
        ws = (torch.randn(v, h, device=device, generator=g) * h**-0.5).to(dtype).requires_grad_()
        hid_t = torch.randn(n, ht, device=device, generator=g).to(dtype)
        wt = (torch.randn(v, ht, device=device, generator=g) * ht**-0.5 * 2).to(dtype)
        labels = torch.randint(0, v, (n,), device=device, generator=g)
        first = None
        for name, fn in IMPLEMENTATIONS:
            cells = dict(shape=f"{n} x {h} (teacher {ht}) x {v}", dtype=dtype_name, impl=name)

            def clear():
                hs.grad = ws.grad = None

            def step(fn=fn):
                clear()
                fn(hs, ws, hid_t, wt, labels).backward()

            try:
                clear()
                loss = fn(hs, ws, hid_t, wt, labels)
                loss.backward()
                result = (loss.detach(), hs.grad.clone(), ws.grad.clone())
                first = first or result
                diff = max(_rel(a, b) for a, b in zip(result, first))
                cells.update(ms=f"{_median_ms(step, cuda, quick):.4g}",
                             mem=f"{_peak_extra_mib(step, cuda, hs, ws):.0f}",
                             diff="(itself)" if result is first else f"{diff:.1e}")
            except Exception as exc:  # an OOM of one implementation must not sink the table
                log.warning("fused-linear bench: %s failed on %s: %s", name, cells["shape"], exc)
                cells.update(ms="OOM" if "out of memory" in str(exc).lower() else f"failed: {type(exc).__name__}",
                             mem="", diff="")
            finally:
                clear()
                if cuda:
                    torch.cuda.empty_cache()
            rows.append(cells)
        out_file.write_text(_markdown(rows, dev_name, cuda, quick))
    table = _markdown(rows, dev_name, cuda, quick)
    out_file.write_text(table)
    return table, out_file


def _markdown(rows, dev_name: str, cuda: bool, quick: bool) -> str:
    import torch

    backend = "Triton kd_loss" if cuda else "the PyTorch reference kd_loss"
    lines = [
        f"# kd_loss from hidden states: unfused against fused_linear_kd_loss on {dev_name}",
        "",
        f"Made by `kdbench bench fused-linear{' --quick' if quick else ''}` on {datetime.date.today()}; torch "
        f"{torch.__version__}, triton {triton_version()}, {torch.get_num_threads()} CPU threads; {backend}.",
        f"Loss: alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE, T = {TEMPERATURE}, alpha = {ALPHA}, from "
        "student hidden states (N x H, trained) and output weight (V x H, trained), and the teacher's (N x Ht, V x "
        "Ht, frozen); forward and backward. Unfused: both models' N x V logits (the teacher's under no_grad), then "
        "kd_loss. Fused: fused_linear_kd_loss with its default chunk (N H / V rows, at least 256 on a CPU and 2048 "
        "on a GPU, rounded down to a power of 2).",
        "Time: " + ("triton.testing.do_bench median." if cuda else "median of perf_counter over a few steps."),
        "Peak extra: " + ("torch.cuda.max_memory_allocated during one step minus what was allocated before it."
                          if cuda else "rise of the process's peak resident memory (VmHWM) during one step."),
        "Diff: max abs difference over the max abs value, of the loss, the hidden states' and the weight's "
        "gradients, each against the unfused implementation's; the largest of the three.",
        "",
        "| shape (N x H x V) | dtype | implementation | median ms | peak extra MiB | diff vs unfused |",
        "|---|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r['shape']} | {r['dtype']} | {r['impl']} | {r['ms']} | {r['mem']} | {r['diff']} |" for r in rows]
    return "\n".join(lines) + "\n"
