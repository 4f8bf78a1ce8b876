"""What the kernel benchmarks share: timing a step, peak memory above the inputs, and the table's header facts."""

from __future__ import annotations

import gc
import re
import statistics
import time
from pathlib import Path


def median_ms(step, cuda: bool, *, warmup: int, rep: int, cpu_runs: int, grad_to_none=()) -> float:
    """Median milliseconds of step(). CUDA: triton.testing.do_bench (CUDA events, L2 flushed between runs, warmup
    and rep in ms). CPU: cpu_runs calls timed with perf_counter. grad_to_none: tensors whose .grad is cleared
    before each run."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none) or None,
                                             return_mode="median"))
    times = []
    for _ in range(cpu_runs):
        for x in grad_to_none:
            x.grad = None
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cuda_peak_extra_mib(step, *leaves) -> float:
    """Peak device memory of one forward+backward above what the inputs already hold (the gradients included):
    the `leaves`' gradients are dropped before, so that the baseline holds none, and after."""
    import torch

    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for leaf in leaves:
        leaf.grad = None
    return peak / 2**20


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def cpu_peak_extra_mib(step, *leaves) -> float:
    """Linux: the rise of this process's peak resident memory (VmHWM, reset to VmRSS first) during one step, with
    the `leaves`' gradients dropped before. Large tensors are mmap'ed and returned when freed, so it sees them."""
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    base = _proc_status_kb("VmRSS")
    step()
    return max(0, _proc_status_kb("VmHWM") - base) / 1024


def bench_page(out_file: Path | None, out_dir: Path, slug: str) -> Path:
    """The page a benchmark writes: `out_file`, or <out_dir>/<slug>.md; its folder is made here, before any timing,
    so an unwritable one fails in one line at once rather than after minutes of measuring."""
    from kdbench.errors import KdbenchError

    page = Path(out_file) if out_file is not None else Path(out_dir) / f"{slug}.md"
    try:
        page.parent.mkdir(parents=True, exist_ok=True)
        page.touch()
    except OSError as e:
        raise KdbenchError(f"cannot write {page}: {e.strerror or e}") from None
    return page


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "absent"
    return triton.__version__
