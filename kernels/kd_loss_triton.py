"""The Triton backend of kd_loss: launches kernels/kd_loss_jit.py on (N, V) logits (and (M, H) features).

`kd_loss_forward` returns the row losses and the gradient, already written in the forward pass; the front
(kernels/front.py) reduces the rows and runs the backward, which scales the gradient by grad_output in place.
Tuning history and the variants that were tried: kernels/TUNING.md.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton

from kdbench.kernels.front import KdLossInputError, front_with_backend, validate_call
from kdbench.kernels.kd_features import feature_args, feature_term
from kdbench.kernels.kd_loss_jit import _kd_loss_fwd_kernel, _scale_rows_kernel

# Rows with next_pow2(V) <= MAX_FUSED_V take the single-read path; tests lower it to exercise the tiled path.
MAX_FUSED_V = 8192
# Tile width under the Triton interpreter (CPU), where autotuning is off.
INTERPRET_BLOCK_V = 2048
# None: warps from the row width (below). A number: that many for every whole-row launch (a benchmark candidate).
SINGLE_WARPS: int | None = None

_DIVERGENCE_CODE = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The tiled path autotunes tile width and warps (on a GPU only). The single-read path takes its warps from the row
# width: 16 elements of each row per thread keeps it near 120 registers with no spills on sm_90 (checked with
# cuobjdump -res-usage on the compiled kernel: 4 warps at 8192 columns spill).
_fwd_tiled = triton.autotune(
    configs=[
        triton.Config({"BLOCK_V": b}, num_warps=w)
        for b, w in ((2048, 8), (4096, 8), (4096, 16), (8192, 16), (8192, 32))
    ],
    key=["V", "DIVERGENCE", "DO_SOFT", "DO_CE", "WRITE_GRAD"],
)(_kd_loss_fwd_kernel)


def _single_num_warps(block: int) -> int:
    return SINGLE_WARPS or max(4, min(16, block // 512))


def check_inputs(s, t, features, who: str = "triton") -> None:
    """Refuse what no Triton kernel takes (`who` names the kernel in the message; the opt-in ones check here too):
    dtypes other than fp32/bf16/fp16, CPU tensors without the interpreter."""
    named = [(s, "student_logits"), (t, "teacher_logits")]
    if features is not None:
        named += [(features[0], "student_features"), (features[1], "teacher_features")]
    for x, what in named:
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise KdLossInputError(f"kd_loss ({who}): {what} must be fp32, bf16 or fp16, got {x.dtype}")
        if not x.is_cuda and not interpreting():
            raise KdLossInputError(
                f"kd_loss ({who}): {what} is on {x.device}; CPU tensors need TRITON_INTERPRET=1 "
                "(or KDBENCH_KERNEL=torch)"
            )


def kd_loss_forward(s, t, labels, opts, want_grad: bool, features=None, want_grad_f: bool = False):
    """Launch the fused kernel on s, t (N, V), and on features = (fs, ft) (M, H) when given, in one launch.
    Returns (row losses (N,) fp32, grad (N, V) or None, scale (1,), feature part), the feature part being None or
    (the feature term: (M,) for 'none', else a scalar; its gradient (M, H) or None)."""
    n, v = s.shape
    dev = s.device
    rows = torch.empty(n, dtype=torch.float32, device=dev)
    grad = torch.empty((n, v), dtype=s.dtype, device=dev) if want_grad else None
    fargs = feature_args(features, opts, want_grad_f, max_block=4096)
    m = fargs.get("M", 0)
    scale = row_scale(labels, opts, n, dev)
    if n + m == 0:
        return rows, grad, scale[0], feature_term(fargs, opts, features)

    args, meta = _launch_args(s, t, labels, rows, grad if want_grad else rows, scale, opts, want_grad)
    if features is not None:  # programs n .. n + m - 1 take the feature rows
        meta.update({k: v for k, v in fargs.items() if k != "M"}, N=n)
    grid = (n + m,)
    block = triton.next_power_of_2(v)
    if block <= MAX_FUSED_V:
        _kd_loss_fwd_kernel[grid](*args, SINGLE=True, BLOCK_V=block, num_warps=_single_num_warps(block), **meta)
    elif interpreting():
        _kd_loss_fwd_kernel[grid](*args, SINGLE=False, BLOCK_V=INTERPRET_BLOCK_V, **meta)
    else:
        _fwd_tiled[grid](*args, SINGLE=False, **meta)
    return rows, grad, scale[0], feature_term(fargs, opts, features)


def row_scale(labels, opts, n: int, device) -> torch.Tensor:
    """(1,) fp32 on the device, for the kernel to load: 1 / n_valid for batchmean, else 1. It stays on the device
    (no host sync); the launchers return it 0-d (scale[0]), as the front's interface has it."""
    if opts["reduction"] == "batchmean" and labels is not None:
        return 1.0 / (labels != opts["ignore_index"]).sum().clamp_min(1).to(torch.float32).reshape(1)
    if opts["reduction"] == "batchmean":
        return torch.full((1,), 1.0 / max(n, 1), dtype=torch.float32, device=device)
    return torch.ones(1, dtype=torch.float32, device=device)


def _launch_args(s, t, labels, rows, grad, scale, opts, want_grad: bool) -> tuple[tuple, dict]:
    """The kernel's runtime arguments and constexprs for s, t (N, V). rows, grad and scale are its outputs (or, to
    compile only, their dtypes); grad is `rows` when no gradient is written."""
    v = s.shape[1]
    T, alpha, beta = float(opts["temperature"]), float(opts["alpha"]), float(opts["beta"])
    divergence = _DIVERGENCE_CODE[opts["divergence"]]
    has_labels = labels is not None
    beta_in = beta if opts["divergence"] == "jsd" else 0.5  # log(beta) is used by jsd only
    args = (
        s, s.stride(0), s.stride(1),
        t, t.stride(0), t.stride(1),
        labels if has_labels else rows, grad, rows, scale,
        v, 1.0 / T, T, alpha, beta_in, math.log(beta_in), math.log1p(-beta_in),
        int(opts["ignore_index"]),
    )
    meta = dict(DIVERGENCE=divergence, HAS_LABELS=has_labels, DO_SOFT=alpha != 0.0,
                DO_CE=alpha != 1.0 and has_labels, SAME_T=T == 1.0, WRITE_GRAD=want_grad)
    return args, meta


def precompile_tiled(student_logits, teacher_logits, labels=None, **kd_loss_kwargs) -> list:
    """Thunks that each compile one autotune config of the tiled kernel for this kd_loss call (fwd + bwd): what the
    autotuner compiles one after another at its first launch, to run in parallel threads before it (Triton's
    compile releases the GIL). Empty for whole rows, or without CUDA."""
    if interpreting() or not student_logits.is_cuda:
        return []
    return [functools.partial(_kd_loss_fwd_kernel.warmup, *args, **kwargs)
            for args, kwargs in _tiled_launches(student_logits, teacher_logits, labels, **kd_loss_kwargs)]


def _tiled_launches(student_logits, teacher_logits, labels=None, **kd_loss_kwargs) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of the tiled kernel under each autotune config, as kd_loss(...) with a gradient would launch
    it, its outputs given as dtypes (Triton compiles for 16-byte aligned pointers of a type, as torch allocates)."""
    s, t, lab, _, opts = validate_call(student_logits, teacher_logits, labels, **kd_loss_kwargs)
    n, v = s.shape
    if n == 0 or triton.next_power_of_2(v) <= MAX_FUSED_V:
        return []
    args, meta = _launch_args(s, t, lab, torch.float32, s.dtype, torch.float32, opts, want_grad=True)
    return [(args, dict(grid=(n,), SINGLE=False, **meta, **config.all_kwargs())) for config in _fwd_tiled.configs]


def scale_rows_(grad: torch.Tensor, go: torch.Tensor) -> None:
    """grad (N, X) contiguous *= go ((N,) or scalar), in place, in fp32."""
    n, x = grad.shape
    if n == 0 or x == 0:
        return
    go = go.to(torch.float32)
    go_stride = 0 if go.dim() == 0 else go.stride(0)
    block = min(triton.next_power_of_2(x), 4096)
    _scale_rows_kernel[(n, triton.cdiv(x, block))](grad, go, go_stride, x, BLOCK=block)


kd_loss = front_with_backend("triton")  # kd_loss with this backend whatever the device (its signature and doc)
