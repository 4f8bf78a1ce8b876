"""Shared checks for the split-row and persistent kd_loss kernels (tests/kernels/test_kd_loss_{split,persistent}.py).

A kernel's launcher (kd_loss_forward) runs on the inputs and its outputs are reduced as the autograd Function
reduces them. The loss and the gradient are then compared with kernels/reference.py in float64 on the same
rounded inputs. Without CUDA the kernels run under the Triton interpreter (tests/conftest.py).
"""

from __future__ import annotations

import torch

from kd_oracle import CUDA, F32, GRAD_RTOL, LOSS_RTOL, assert_close_rel, make_inputs
from kdbench.kernels import reference
from kdbench.kernels.front import DEFAULTS, reduce_rows, validate


def run(forward, s, t, labels=None, *, fs=None, ft=None, want_grad=True, launch=None, **kw):
    """The launcher's (loss reduced as the autograd Function does, gradient d loss / d s at grad_output 1,
    feature gradient or None), on the device the kernel runs on."""
    dev = "cuda" if CUDA else "cpu"
    opts = dict(DEFAULTS, **kw)
    s2, t2, lab, feats = validate(s.to(dev), t.to(dev), None if labels is None else labels.to(dev),
                                  student_features=None if fs is None else fs.to(dev),
                                  teacher_features=None if ft is None else ft.to(dev), **opts)
    rows, grad, scale, feature_part = forward(s2, t2, lab, opts, want_grad, feats, feats is not None,
                                              **(launch or {}))
    loss, grad_f = reduce_rows(rows, scale, feature_part, opts["reduction"])
    return loss, grad, grad_f


def check(forward, s, t, labels=None, *, fs=None, ft=None, launch=None, **kw):
    """Compare the launcher with the float64 reference; returns (loss, grad) on the CPU."""
    loss, grad, grad_f = run(forward, s, t, labels, fs=fs, ft=ft, launch=launch, **kw)
    s64 = s.detach().double().requires_grad_()
    fs64 = None if fs is None else fs.detach().double().requires_grad_()
    exp = reference.kd_loss(s64, t.double(), labels, student_features=fs64,
                            teacher_features=None if ft is None else ft.double(), **dict(DEFAULTS, **kw))
    assert loss.dtype == torch.float32
    assert_close_rel(loss, exp, LOSS_RTOL[s.dtype], "loss")
    exp.sum().backward()
    assert grad.dtype == s.dtype and grad.shape == s.reshape(-1, s.shape[-1]).shape
    assert_close_rel(grad, s64.grad.reshape(grad.shape), GRAD_RTOL[s.dtype], "grad student_logits")
    if fs is not None:
        assert_close_rel(grad_f, fs64.grad.reshape(grad_f.shape), GRAD_RTOL[fs.dtype], "grad student_features")
    return loss.detach().cpu(), grad.detach().cpu()


def with_neg_inf(s, t, labels, divergence, step=7):
    """Masked vocabulary: every step-th entry -inf in the teacher (and in the student for reverse KL and jsd,
    where a student mass without a teacher one is a truly infinite divergence), and a long masked run in row 0
    (whole chunks of -inf on the split kernel); no label on a masked entry."""
    t[:, ::step] = float("-inf")
    t[0, s.shape[1] // 3:] = float("-inf")
    if divergence != "forward_kl":
        s[:, ::step] = float("-inf")
        s[0, s.shape[1] // 3:] = float("-inf")
    labels[labels % step == 0] = 1
    labels[0] = 3
    return s, t, labels


def check_through_front(monkeypatch, module, env: dict):
    """kdbench.kernels.kd_loss under `env` runs `module`'s launcher (a spy counts its calls), on (B, L, V) logits
    with features, fp32, and grad_output 3.7: loss and both gradients against the float64 reference."""
    import kdbench.kernels as kernels

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    real = module.kd_loss_forward

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "kd_loss_forward", spy)
    s, t, labels = make_inputs(6, 300, ignored=(4,))
    s, t, labels = s.reshape(2, 3, 300), t.reshape(2, 3, 300), labels.reshape(2, 3)
    g = torch.Generator().manual_seed(3)
    fs, ft = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    dev = "cuda" if CUDA else "cpu"
    a, fa = s.clone().to(dev).requires_grad_(), fs.clone().to(dev).requires_grad_()
    kw = dict(temperature=2.0, alpha=0.6, divergence="reverse_kl", feature_weight=0.5)
    out = kernels.kd_loss(a, t.to(dev), labels.to(dev), student_features=fa, teacher_features=ft.to(dev), **kw)
    (out * 3.7).backward()
    s64, fs64 = s.detach().double().requires_grad_(), fs.detach().double().requires_grad_()
    exp = reference.kd_loss(s64, t.double(), labels, student_features=fs64, teacher_features=ft.double(), **kw)
    (exp * 3.7).backward()
    assert calls == [(6, 300)], calls  # flattened to (N, V) by the front, one launch
    assert_close_rel(out, exp, LOSS_RTOL[F32], "loss")
    assert_close_rel(a.grad, s64.grad, GRAD_RTOL[F32], "grad student_logits (grad_output 3.7)")
    assert_close_rel(fa.grad, fs64.grad, GRAD_RTOL[F32], "grad student_features (grad_output 3.7)")
