"""GPU check of the new kd_loss kernels (split-row, persistent) beside the old one, torch.compile and a copy.

    python -m kdbench.kernels.gpu_variants [--out FILE] [--no-compile] [--budget-s 240]   (on CUDA)
    TRITON_INTERPRET=1 python -m kdbench.kernels.gpu_variants --dry-run                     (on the CPU)
    python -m kdbench.kernels.gpu_variants --static        (sm_90 builds' registers and SASS counts, any machine)

It checks before it times:
1. correctness: every divergence at T = 0.5, 1 and 2, bf16 and fp32, with ignored rows and -inf entries, for each
   new kernel in its default mode (on CUDA the split kernel's single launch with waits, the mode the CPU tests
   cannot run for rows of several chunks) and the split kernel's multi-launch mode, against
   kernels/reference.py in float64;
2. timing of fwd+bwd work (forward KL + CE, T = 2, alpha 0.5: the results/kernels table's loss) on 8192 x 128256
   bf16 and 65536 x 1000 fp32. Each row is the launcher, which writes the gradient in the forward pass (the
   autograd Function around it adds the same for all), checked on 64 of its rows. torch.compile runs the eager
   formula's forward and backward; "copy" is a read of two N x V tensors and a write of one (torch.add), the 3 N V
   floor measured on the card.
It prints one markdown table (and writes it with --out). A kernel that fails its check is still timed, marked FAIL.
The dry run uses tiny shapes under the interpreter and times nothing meaningful: it only proves the script runs.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time

import torch

SHAPES = [(8192, 128256, torch.bfloat16), (65536, 1000, torch.float32)]
DRY_SHAPES = [(3, 9000, torch.bfloat16), (16, 100, torch.float32)]  # 9000 > MAX_V: the split kernel
TIMED = dict(temperature=2.0, alpha=0.5, divergence="forward_kl", beta=0.5, ignore_index=-100,
             reduction="batchmean", feature_weight=0.0)
SAMPLE = 32  # rows checked at each end of a timed shape


def old_forward():
    """The old kernel's launcher, under its name before or after the kernels/ refactor."""
    for name in ("kdbench.kernels.kd_loss_triton", "kdbench.kernels.kd_loss"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "kd_loss_forward"):
            return mod.kd_loss_forward
    raise ImportError("no module with the old kd_loss_forward launcher found")


def variants(v: int, dry: bool) -> dict:
    """name -> launcher(s, t, labels, opts, want_grad) for rows of v columns."""
    from kdbench.kernels import kd_loss_persistent as persistent
    from kdbench.kernels import kd_loss_split as split

    small = {"chunk": 1024} if dry else {}
    out = {"kd_loss (old)": old_forward()}
    if triton_next_pow2(v) <= persistent.MAX_V:
        out["persistent"] = persistent.kd_loss_forward
        if not dry:
            out["persistent, maxnreg 232"] = _with(persistent.kd_loss_forward, maxnreg=232)
            for w in (1, 2, 4):
                if w != persistent.num_warps_for(triton_next_pow2(v)):
                    out[f"persistent, {w} warps"] = _with(persistent.kd_loss_forward, num_warps=w)
    else:
        out["split"] = _with(split.kd_loss_forward, **small)
        out["split, multi-launch"] = _with(split.kd_loss_forward, two_launch=True, **small)
        if not dry:
            out["split, chunk 4096"] = _with(split.kd_loss_forward, chunk=4096)
            out["split, T = 2 CE exps direct"] = _with(split.kd_loss_forward, t_pow=False)
    return out


def _with(fn, **kw):
    def call(s, t, labels, opts, want_grad):
        return fn(s, t, labels, opts, want_grad, **kw)

    return call


def triton_next_pow2(v: int) -> int:
    return 1 << (v - 1).bit_length()


def inputs(n, v, dtype, device, *, seed=0, masked=False):
    g = torch.Generator(device=device).manual_seed(seed)
    s = (torch.randn(n, v, generator=g, device=device) * 3).to(dtype)
    t = (s.float() * 0.5 + torch.randn(n, v, generator=g, device=device) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    if masked:
        labels[1::5] = -100
        t[:, ::7] = float("-inf")
        s[:, ::7] = float("-inf")  # reverse KL and jsd need the student masked where the teacher is
        labels[labels % 7 == 0] = 1
    return s, t, labels


def rel_err(actual, expected) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if torch.isnan(actual).any() or not torch.equal(torch.isinf(actual), torch.isinf(expected)):
        return math.inf
    fin = torch.isfinite(expected)
    if not fin.any():
        return 0.0
    return ((actual[fin] - expected[fin]).abs().max() / expected[fin].abs().max().clamp_min(1e-30)).item()


def check(fn, s, t, labels, opts, rows_idx=None) -> tuple[float, float]:
    """(loss, grad) relative errors of a launcher against the float64 reference, per row (reduction 'sum', so
    the gradient is d row loss / d s), on rows_idx (default all)."""
    from kdbench.kernels import reference

    opts = dict(opts, reduction="sum")
    rows, grad, _, _ = fn(s, t, labels, opts, True)
    idx = rows_idx if rows_idx is not None else torch.arange(s.shape[0], device=s.device)
    s64 = s[idx].double().requires_grad_()
    ref = reference.kd_loss(s64, t[idx].double(), labels[idx], **{**opts, "reduction": "none"})
    ref.sum().backward()
    return rel_err(rows[idx], ref.detach()), rel_err(grad[idx], s64.grad)


def correctness(device: str, dry: bool) -> list[str]:
    """The divergence x temperature x dtype matrix for the new kernels; returns failure lines (empty: all pass)."""
    from kdbench.kernels import kd_loss_persistent as persistent
    from kdbench.kernels import kd_loss_split as split

    fails = []
    n, chunk = (3, 512) if dry else (64, None)
    kernels = {
        "split": (1500 if dry else 50257, _with(split.kd_loss_forward, chunk=chunk)),
        "split, multi-launch": (1500 if dry else 50257, _with(split.kd_loss_forward, chunk=chunk, two_launch=True)),
        "persistent": (1000, persistent.kd_loss_forward),
    }
    temps = (2.0,) if dry else (0.5, 1.0, 2.0)
    for name, (v, fn) in kernels.items():
        for dtype in (torch.bfloat16, torch.float32):
            s, t, labels = inputs(n, v, dtype, device, masked=True)
            for div in ("forward_kl", "reverse_kl", "jsd"):
                for T in temps:
                    opts = dict(TIMED, divergence=div, temperature=T, alpha=0.7)
                    e_loss, e_grad = check(fn, s, t, labels, opts)
                    tol = 1e-5 if dtype == torch.float32 else 1e-2
                    if not (e_loss <= max(tol, 1e-4) and e_grad <= tol):
                        fails.append(f"{name} {dtype} {div} T={T}: loss err {e_loss:.2e}, grad err {e_grad:.2e}")
    return fails


def timer(dry: bool):
    if dry:
        def cpu_time(fn):
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        return cpu_time
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def eager_fwd_bwd(s, t, labels):
    import torch.nn.functional as F

    T, alpha = TIMED["temperature"], TIMED["alpha"]
    log_ps = F.log_softmax(s.float() / T, dim=-1)
    log_pt = F.log_softmax(t.float() / T, dim=-1)
    soft = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    loss = alpha * T * T * soft + (1.0 - alpha) * F.cross_entropy(s.float(), labels)
    loss.backward()
    return loss


def time_shape(n, v, dtype, device, dry: bool, compile_: bool, deadline: float) -> list[tuple]:
    """Rows (shape, name, ms, of floor, loss err, grad err, note) for one shape."""
    bench = timer(dry)
    s, t, labels = inputs(n, v, dtype, device)
    nbytes = 3 * n * v * s.element_size()
    out = torch.empty_like(s)
    copy_ms = bench(lambda: torch.add(s, t, out=out))
    shape = f"{n} x {v} {str(dtype).replace('torch.', '')}"
    rows = [(shape, "copy (3 N V bytes)", copy_ms, 1.0, None, None, f"{nbytes / copy_ms / 1e9:.2f} TB/s")]
    sample = torch.cat([torch.arange(min(SAMPLE, n)), torch.arange(max(n - SAMPLE, 0), n)]).unique().to(device)
    for name, fn in variants(v, dry).items():
        if time.monotonic() > deadline:
            rows.append((shape, name, None, None, None, None, "skipped: out of time"))
            continue
        try:
            e_loss, e_grad = check(fn, s, t, labels, TIMED, sample)
            ms = bench(lambda: fn(s, t, labels, TIMED, True))
        except Exception as exc:  # one variant's failure must not cost the others' rows
            rows.append((shape, name, None, None, None, None, f"error: {type(exc).__name__}: {exc}"[:120]))
            continue
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        ok = e_loss <= max(tol, 1e-4) and e_grad <= tol
        rows.append((shape, name, ms, ms / copy_ms, e_loss, e_grad, "" if ok else "FAIL"))
    if compile_ and time.monotonic() < deadline:
        s_req = s.detach().clone().requires_grad_()
        fn = torch.compile(eager_fwd_bwd)
        try:
            ms = bench(lambda: fn(s_req, t, labels))
            rows.append((shape, "torch.compile (eager formula)", ms, ms / copy_ms, None, None, ""))
        except Exception as exc:
            rows.append((shape, "torch.compile (eager formula)", None, None, None, None, f"error: {exc}"[:120]))
    return rows


def table(rows, header: str) -> str:
    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    lines = [header, "", "| shape | kernel | ms | x copy | loss err | grad err | note |",
             "|---|---|---:|---:|---:|---:|---|"]
    for shape, name, ms, of, el, eg, note in rows:
        lines.append(f"| {shape} | {name} | {f(ms, '.3f')} | {f(of, '.2f')} | {f(el, '.1e')} | {f(eg, '.1e')} | "
                     f"{note} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Static sm_90 builds (no GPU needed): python -m kdbench.kernels.gpu_variants --static
# ----------------------------------------------------------------------------------------------------------------
def sm90_source(fn, args: tuple, meta: dict):
    """(ASTSource, constexprs) of `fn` for one launch's positional args and constexprs, specialized as Triton's
    launcher would: integer 1 becomes a constexpr, pointers and integers divisible by 16 get the 16-divisibility
    hint. For static compiles without a GPU (kernels/gpu_variants.py --static, the tests):
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": w})
    Tensors may be given as torch dtypes (only their type matters)."""
    from triton.compiler import ASTSource

    names = [n for n in fn.arg_names if n not in meta]
    sig, consts, attrs = {}, dict(meta), {}
    for i, (name, value) in enumerate(zip(names, args)):
        index = fn.arg_names.index(name)
        dtype = value if isinstance(value, torch.dtype) else getattr(value, "dtype", None)
        if dtype is not None:
            sig[name] = "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                               torch.int64: "i64", torch.int32: "i32"}[dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or isinstance(value, float):
            sig[name] = "fp32"
        elif value == 1:
            consts[name] = 1
            sig[name] = "constexpr"
        else:
            sig[name] = "i64" if abs(value) >= 2 ** 31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    for name in meta:
        sig[name] = "constexpr"
    return ASTSource(fn, {n: sig[n] for n in fn.arg_names}, constexprs=consts, attrs=attrs), consts


def static_builds():
    """(name, kernel, args, constexprs, warps) of the new kernels' default launches on the two timed shapes, for
    every divergence, from the launchers themselves on meta tensors."""
    from kdbench.kernels import kd_loss_persistent as persistent
    from kdbench.kernels import kd_loss_split as split

    out = []
    for div in ("forward_kl", "reverse_kl", "jsd"):
        opts = dict(TIMED, divergence=div)
        for (n, v, dtype) in SHAPES:
            s = torch.empty((n, v), dtype=dtype, device="meta")
            lab = torch.empty(n, dtype=torch.int64, device="meta")
            tag = f"{n}x{v} {str(dtype).replace('torch.', '')} {div}"
            if v > persistent.MAX_V:
                _, args, meta = split.launch_args(s, s, lab, opts, True)
                out.append((f"split {tag}", split._kd_loss_split_kernel, args, dict(meta, PHASE=0), split.NUM_WARPS))
            else:
                _, args, meta = persistent.launch_args(s, s, lab, opts, True)
                out.append((f"persistent {tag}", persistent._kd_loss_persistent_kernel, args, meta,
                            persistent.num_warps_for(meta["BLOCK_V"])))
    return out


def static_report() -> str:
    """Registers, spills and SASS counts of static_builds() (Triton's own compiler and the wheel's cuobjdump)."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    lines = ["| build | warps | registers | spill stack | SASS | MUFU.EX2 | BAR.SYNC | elements / thread |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, fn, args, meta, warps in static_builds():
        src, _ = sm90_source(fn, args, meta)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
            fh.write(k.asm["cubin"])
            fh.flush()
            res = subprocess.run([tool, "-res-usage", fh.name], capture_output=True, text=True).stdout
            sass = subprocess.run([tool, "-sass", fh.name], capture_output=True, text=True).stdout
        ins = [x for x in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", x)]
        regs, stack = re.search(r"REG:(\d+)", res).group(1), re.search(r"STACK:(\d+)", res).group(1)
        per_thread = meta.get("CHUNK", meta.get("BLOCK_V")) // (32 * warps)
        lines.append(f"| {name} | {warps} | {regs} | {stack} | {len(ins)} | {sum('MUFU.EX2' in x for x in ins)} | "
                     f"{sum('BAR.SYNC' in x for x in ins)} | {per_thread} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes under TRITON_INTERPRET=1 on the CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new timings after this")
    ap.add_argument("--static", action="store_true", help="sm_90 builds' registers and SASS counts, no GPU needed")
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    if args.static:
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("--static compiles for sm_90: run it without TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        print(static_report())
        return 0
    # the budget is the GPU call's; a dry run on a busy CPU takes what it takes
    deadline = math.inf if args.dry_run else time.monotonic() + args.budget_s
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--dry-run needs TRITON_INTERPRET=1 set before Python starts", file=sys.stderr)
            return 2
        device, shapes = "cpu", DRY_SHAPES
    elif not torch.cuda.is_available():
        print("no CUDA device: use --dry-run (with TRITON_INTERPRET=1) on the CPU", file=sys.stderr)
        return 2
    else:
        device, shapes = "cuda", SHAPES
    fails = correctness(device, args.dry_run)
    print("correctness:", "all pass" if not fails else f"{len(fails)} FAIL", file=sys.stderr)
    for line in fails:
        print("  FAIL", line, file=sys.stderr)
    rows = []
    for n, v, dtype in shapes:
        rows += time_shape(n, v, dtype, device, args.dry_run, not args.no_compile and not args.dry_run, deadline)
    name = "CPU interpreter (dry run: times are not meaningful)" if args.dry_run else torch.cuda.get_device_name()
    import triton

    header = (f"kd_loss variants, fwd+bwd work, forward KL + CE, T = 2, alpha 0.5, on {name}; torch "
              f"{torch.__version__}, triton {triton.__version__}. Correctness matrix: "
              f"{'all pass' if not fails else '; '.join(fails)}")
    text = table(rows, header)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 1 if fails or any(r[6] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
