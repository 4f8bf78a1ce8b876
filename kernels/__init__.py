"""Fused distillation-loss kernels (Triton) and their exact PyTorch reference; imported as kdbench.kernels.

`fused_linear_kd_loss` (kernels/fused_linear.py) is the same loss taken from hidden states and output layers,
chunk by chunk, so that no (N, V) logits exist; each chunk goes through `kd_loss`. `top_k_kd_loss`
(kernels/top_k.py) is the loss against a cached teacher that kept its k most likely tokens per row
(`teacher_top_k`), or n tokens it drew (`teacher_samples`); its bucket divergence goes through `kd_loss` too.

`kd_loss` dispatches: the Triton kernel (kernels/kd_loss.py) for CUDA tensors, the chunked PyTorch reference
(kernels/reference.py) otherwise. The environment variable KDBENCH_KERNEL overrides it:
    KDBENCH_KERNEL=torch    always the reference (any device: an A/B check of the kernel on a GPU)
    KDBENCH_KERNEL=triton   always the Triton kernel; on CPU tensors this needs TRITON_INTERPRET=1 (how CI tests it)
    unset / auto            by device
Importing this package imports neither triton nor the kernel module, and queries no device.

`kd_loss` here is always the dispatcher function. The kernel module shares its name (kernels/kd_loss.py), and
Python would rebind this package's `kd_loss` attribute to that module when it is first imported; the package's
module class refuses that rebinding. Reach the module with `from kdbench.kernels.kd_loss import ...` or
`importlib.import_module("kdbench.kernels.kd_loss")` (`import kdbench.kernels.kd_loss as m` gives the function).
"""

from __future__ import annotations

import os
import sys
import types

from kdbench.kernels.fused_linear import fused_linear_kd_loss
from kdbench.kernels.reference import KD_LOSS_DOC, KdLossInputError
from kdbench.kernels.top_k import teacher_samples, teacher_top_k, top_k_kd_loss

__all__ = ["kd_loss", "fused_linear_kd_loss", "teacher_top_k", "teacher_samples", "top_k_kd_loss", "KD_LOSS_DOC", "KdLossInputError",
           "backend_for"]

_BACKENDS = ("auto", "triton", "torch")


def backend_for(student_logits) -> str:
    """'triton' or 'torch': the implementation kd_loss uses for these logits under the current KDBENCH_KERNEL."""
    choice = os.environ.get("KDBENCH_KERNEL", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise KdLossInputError(f"KDBENCH_KERNEL={choice!r} is not one of: {', '.join(_BACKENDS)}")
    if choice != "auto":
        return choice
    import torch

    supported = student_logits.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return "triton" if student_logits.is_cuda and supported else "torch"


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
    if backend_for(student_logits) == "triton":
        from kdbench.kernels.kd_loss import kd_loss as impl
    else:
        from kdbench.kernels.reference import kd_loss as impl
    return impl(
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        alpha=alpha,
        divergence=divergence,
        beta=beta,
        ignore_index=ignore_index,
        reduction=reduction,
        student_features=student_features,
        teacher_features=teacher_features,
        feature_weight=feature_weight,
    )


kd_loss.__doc__ = KD_LOSS_DOC


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name == "kd_loss" and isinstance(value, types.ModuleType):
            return  # keep the dispatcher; the submodule stays in sys.modules["kdbench.kernels.kd_loss"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
