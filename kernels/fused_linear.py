"""kd_loss with the output layers inside it: no (N, V) logits in memory, for large vocabularies.

A language model's logits are one Linear away from its last hidden state. For Llama 3 (V = 128256) a batch of
8192 tokens has 4.2 GB of fp32 logits per model, and distillation holds the student's, the teacher's and the
student's gradient at once. `fused_linear_kd_loss` takes the hidden states and the output layers' weights instead,
and walks the rows in chunks: each chunk's logits are computed, handed to `kd_loss` (the Triton kernel on a GPU,
the reference elsewhere, as always), and turned into the gradients of the student's hidden states, weight and
bias before the next chunk. Only one chunk of logits lives at a time. Liger-Kernel's fused linear losses do the
same for cross-entropy and JSD; this one is kd_loss's whole loss (every divergence, temperature, hard-label CE).

Like kd_loss, it computes the gradients in the forward pass, so its backward only scales them by grad_output.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from kdbench.kernels.front import DEFAULTS, KdLossInputError, kd_loss

FUSED_LINEAR_DOC = """kd_loss of logits = hidden @ weight.T + bias, computed chunk by chunk over the rows.

    fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                         student_bias=None, teacher_bias=None, temperature=1.0, alpha=0.5,
                         divergence="forward_kl", beta=0.5, ignore_index=-100, reduction="batchmean",
                         chunk_rows=None)

equals kd_loss(F.linear(student_hidden, student_weight, student_bias),
               F.linear(teacher_hidden, teacher_weight, teacher_bias), labels, ...)
in value and gradients (see kd_loss for the loss, the valid rows and the reductions), without holding either
(N, V) logits tensor: at most chunk_rows rows of logits exist at once.

Shapes: hidden (N, H) or (B, L, H), the teacher's (..., Ht) with the same leading dims; weights (V, H) and
(V, Ht), as nn.Linear stores them; biases (V,) or None; labels (N,) or (B, L). The student and teacher
output layers must have the same number of rows V (one vocabulary).
reduction: "batchmean" or "sum" ("none" is refused: the gradients are computed in the forward pass, for a
scalar loss). chunk_rows: rows per chunk; default: N * H / V rows (a chunk's logits as large as the student's
hidden states), at least 256 on a CPU and 2048 on a GPU (each chunk also updates the whole (V, H) weight
gradient), rounded down to a power of 2, at most N.
The logits run in whatever autocast state is active (a model's output layer under bf16 autocast gives bf16
logits here too). Gradients flow to student_hidden, student_weight and student_bias; the teacher's tensors
get none.
"""


# Fewest rows per chunk, by device. Each chunk also reads and writes the whole (V, H) fp32 weight gradient, about
# 10 V H bytes, against about 2 rows V (3 H + Ht) matmul FLOPs: the update's share of the time falls as the rows
# grow, whatever V. CPU: measured on the 2-core box (512 x 768 x 50257, fp32): 16-row chunks took 3.0x the unfused
# time, 64 rows 1.7x, 256 rows 1.05x. CUDA: unmeasured; at a Hopper's ~200 FLOP per byte of HBM the update stays
# near a tenth of the matmul time from about 2000 rows.
MIN_CHUNK_ROWS = {"cpu": 256, "cuda": 2048}


def default_chunk_rows(n: int, hidden: int, vocab: int, device_type: str = "cpu") -> int:
    """Rows per chunk: a chunk's logits (rows x V) about the size of the student's hidden states (N x H), so that
    the loss's extra memory stays of the order of what the model already holds, but at least the device's
    MIN_CHUNK_ROWS. Rounded down to a power of 2, at most N."""
    rows = max(n * hidden // max(1, vocab), MIN_CHUNK_ROWS.get(device_type, MIN_CHUNK_ROWS["cuda"]))
    return max(1, min(n, 1 << (rows.bit_length() - 1)))


def _check(hs, ws, bs, ht, wt, bt, labels, reduction, chunk_rows) -> None:
    name = "fused_linear_kd_loss"
    for arg, t in (("student_hidden", hs), ("student_weight", ws), ("teacher_hidden", ht), ("teacher_weight", wt)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise KdLossInputError(f"{name}: {arg} must be a floating-point tensor")
    if hs.dim() < 2 or ht.dim() < 2:
        raise KdLossInputError(
            f"{name}: hidden states must be (N, H) or (B, L, H), got {tuple(hs.shape)} and {tuple(ht.shape)}"
        )
    if hs.shape[:-1] != ht.shape[:-1]:
        raise KdLossInputError(
            f"{name}: student_hidden {tuple(hs.shape)} and teacher_hidden {tuple(ht.shape)} differ in their "
            "leading dims"
        )
    for who, h, w in (("student", hs, ws), ("teacher", ht, wt)):
        if w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise KdLossInputError(
                f"{name}: {who}_weight must be (V, {h.shape[-1]}) for {who}_hidden of width {h.shape[-1]}, "
                f"got {tuple(w.shape)}"
            )
    if wt.shape[0] != ws.shape[0]:
        raise KdLossInputError(
            f"{name}: the teacher's output layer has {wt.shape[0]} rows and the student's {ws.shape[0]}: "
            "teacher and student need one vocabulary"
        )
    for who, b, w in (("student", bs, ws), ("teacher", bt, wt)):
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise KdLossInputError(f"{name}: {who}_bias must be ({w.shape[0]},), got {tuple(b.shape)}")
    devices = {t.device for t in (hs, ws, ht, wt, bs, bt, labels) if t is not None}
    if len(devices) > 1:
        raise KdLossInputError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != hs.shape[:-1]):
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise KdLossInputError(f"{name}: labels shape {got} does not match the hidden states' leading dims "
                               f"{tuple(hs.shape[:-1])}")
    if reduction not in ("batchmean", "sum"):
        raise KdLossInputError(
            f"{name}: reduction must be 'batchmean' or 'sum', got {reduction!r} (the gradients are computed in "
            "the forward pass, for a scalar loss)"
        )
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise KdLossInputError(f"{name}: chunk_rows must be a positive integer, got {chunk_rows!r}")


class _FusedLinearKd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, labels, options):
        opts = dict(options)
        chunk_rows, reduction, ignore_index = opts.pop("chunk_rows"), opts.pop("reduction"), opts["ignore_index"]
        grad_on = opts.pop("grad_on")  # apply() runs forward under no_grad; needs_input_grad ignores the grad mode
        h, v = hs.shape[-1], ws.shape[0]
        hs2, ht2 = hs.reshape(-1, h), ht.reshape(-1, ht.shape[-1])
        y = None if labels is None else labels.reshape(-1)
        n = hs2.shape[0]
        rows = chunk_rows or default_chunk_rows(n, h, v, hs.device.type)
        want_h, want_w, want_b = (grad_on and ctx.needs_input_grad[k] for k in range(3))
        want_any = want_h or want_w or want_b
        grad_h = torch.zeros_like(hs2) if want_h else None
        # fp32 (or the weight's dtype if wider) accumulators: one addend per chunk, each rounded once at most
        acc = torch.promote_types(ws.dtype, torch.float32)
        grad_w = torch.zeros(ws.shape, dtype=acc, device=ws.device) if want_w else None
        grad_b = torch.zeros(v, dtype=acc, device=ws.device) if want_b else None
        total = None
        for i in range(0, n, rows):
            j = min(n, i + rows)
            s = F.linear(hs2[i:j], ws, bs)
            t = F.linear(ht2[i:j], wt, bt)
            if want_any:
                s.requires_grad_(True)
            with torch.enable_grad():
                try:
                    part = kd_loss(s, t, None if y is None else y[i:j], reduction="sum", **opts)
                except KdLossInputError as err:  # its rows count from the chunk's first
                    raise KdLossInputError(f"fused_linear_kd_loss: in the chunk of rows from {i}: {err}") from None
                g = torch.autograd.grad(part, s)[0] if want_any else None
            total = part.detach() if total is None else total + part.detach()
            if g is None:
                continue
            if want_h:
                grad_h[i:j] = g @ ws
            if want_w and g.dtype == acc and hs2.dtype == acc:
                grad_w.addmm_(g.t(), hs2[i:j])  # in place: no (V, H) temporary per chunk
            elif want_w:  # bf16 / fp16 logits (autocast): the product in their dtype, accumulated in fp32
                grad_w += g.t() @ hs2[i:j]
            if want_b:
                grad_b += g.sum(0, dtype=acc)
        if total is None:  # no rows
            total = hs.new_zeros((), dtype=torch.float64 if hs.dtype == torch.float64 else torch.float32)
        if reduction == "batchmean":
            valid = torch.tensor(n, device=hs.device) if y is None else (y != ignore_index).sum()
            scale = 1.0 / valid.clamp(min=1).to(total.dtype)  # a tensor: no host sync on a GPU
            total = total * scale
            for grad in (grad_h, grad_w, grad_b):
                if grad is not None:
                    grad.mul_(scale.to(grad.dtype))
        ctx.shapes = (hs.shape, ws.dtype, None if bs is None else bs.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        hidden_shape, w_dtype, b_dtype = ctx.shapes
        scale = None if bool(go == 1) else go
        out = []
        for grad, shape, dtype in ((grad_h, hidden_shape, None), (grad_w, None, w_dtype), (grad_b, None, b_dtype)):
            if grad is None:
                out.append(None)
                continue
            grad = grad if scale is None else grad * scale.to(grad.dtype)
            if shape is not None:
                grad = grad.reshape(shape)
            out.append(grad if dtype is None else grad.to(dtype))
        return out[0], out[1], out[2], None, None, None, None, None


# The options fused_linear_kd_loss hands on to kd_loss: their defaults are kd_loss's (front.DEFAULTS).
LOSS_OPTIONS = ("temperature", "alpha", "divergence", "beta", "ignore_index", "reduction")


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                         student_bias=None, teacher_bias=None, chunk_rows=None, **loss_options):
    unknown = set(loss_options) - set(LOSS_OPTIONS)
    if unknown:
        raise KdLossInputError(f"fused_linear_kd_loss: unknown argument(s) {', '.join(sorted(unknown))}")
    options = {name: loss_options.get(name, DEFAULTS[name]) for name in LOSS_OPTIONS}
    _check(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
           options["reduction"], chunk_rows)
    options.update(chunk_rows=chunk_rows, grad_on=torch.is_grad_enabled())
    teacher = [None if t is None else t.detach() for t in (teacher_hidden, teacher_weight, teacher_bias)]
    return _FusedLinearKd.apply(student_hidden, student_weight, student_bias, *teacher, labels, options)


def _signature() -> inspect.Signature:
    """fused_linear_kd_loss's signature as help() should show it: the loss options named, with their defaults."""
    params = list(inspect.signature(fused_linear_kd_loss).parameters.values())[:-1]  # without **loss_options
    named = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=DEFAULTS[name]) for name in LOSS_OPTIONS]
    return inspect.Signature(params[:-1] + named + params[-1:])  # chunk_rows last, as FUSED_LINEAR_DOC has it


fused_linear_kd_loss.__signature__ = _signature()
fused_linear_kd_loss.__doc__ = FUSED_LINEAR_DOC
