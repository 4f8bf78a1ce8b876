"""Fused distillation-loss kernels (Triton) and their exact PyTorch reference; imported as kdbench.kernels.

`kd_loss` is the loss on (N, V) logits (kernels/front.py: its contract, validation and dispatch to the Triton
kernel on CUDA or the reference elsewhere). `fused_linear_kd_loss` takes hidden states and output layers instead
of logits; `top_k_kd_loss` takes a cached teacher's top k (`teacher_top_k`) or sampled (`teacher_samples`) tokens.
Importing this package imports neither triton nor a kernel module, and queries no device.
"""

from __future__ import annotations

from kdbench.kernels.front import KD_LOSS_DOC, KdLossInputError, backend_for, kd_loss
from kdbench.kernels.fused_linear import fused_linear_kd_loss
from kdbench.kernels.top_k import teacher_samples, teacher_top_k, top_k_kd_loss

__all__ = ["kd_loss", "fused_linear_kd_loss", "teacher_top_k", "teacher_samples", "top_k_kd_loss", "KD_LOSS_DOC",
           "KdLossInputError", "backend_for"]
