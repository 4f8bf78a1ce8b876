"""The float64 oracle and the input/check helpers of the kd_loss tests (test_kd_loss.py, test_kd_loss_front.py).

Without CUDA the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1), selected through the
dispatcher with KDBENCH_KERNEL=triton; the `impl` fixture runs a test once per backend.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.kernels import kd_loss
from kdbench.kernels.front import DEFAULTS

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

CUDA = torch.cuda.is_available()
# Relative tolerances (max abs error / max abs expected), per DESIGN.md section 5. The loss is returned in fp32
# for every input dtype, so it is held tighter than the gradient, which is rounded to the logits' dtype.
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(params=["triton", "torch"])
def impl(request, monkeypatch):
    """Which implementation the dispatcher runs; also the device its inputs live on."""
    monkeypatch.setenv("KDBENCH_KERNEL", request.param)
    return request.param


def device_for(impl: str) -> str:
    return "cuda" if impl == "triton" and CUDA else "cpu"


# ----------------------------------------------------------------------------------------------------------------
# The float64 oracle: the naive formulas with autograd (no analytic gradient, no chunking, no online softmax).
# ----------------------------------------------------------------------------------------------------------------


def _masked_mul(p, x):
    # p * x with 0 where p == 0; the inner where keeps NaN out of autograd's backward too.
    return p * torch.where(p > 0, x, torch.zeros((), dtype=x.dtype))


def oracle(s, t, labels=None, *, student_features=None, teacher_features=None, **options):
    """kd_loss(s, t, labels, **options) by the naive formulas; the options' defaults are kd_loss's."""
    unknown = set(options) - set(DEFAULTS)
    assert not unknown, f"oracle: unknown option(s) {unknown}"
    o = dict(DEFAULTS, **options)
    T, alpha, divergence, beta = o["temperature"], o["alpha"], o["divergence"], o["beta"]
    ignore_index, reduction, feature_weight = o["ignore_index"], o["reduction"], o["feature_weight"]
    v = s.shape[-1]
    s2, t2 = s.reshape(-1, v), t.reshape(-1, v)
    ls, lt = torch.log_softmax(s2 / T, -1), torch.log_softmax(t2 / T, -1)
    ps, pt = ls.exp(), lt.exp()
    if divergence == "forward_kl":
        d = _masked_mul(pt, lt - ls).sum(-1)
    elif divergence == "reverse_kl":
        d = _masked_mul(ps, ls - lt).sum(-1)
    else:
        m = beta * pt + (1 - beta) * ps
        lm = torch.where(m > 0, torch.log(torch.where(m > 0, m, torch.ones((), dtype=m.dtype))), -math.inf)
        d = beta * _masked_mul(pt, lt - lm).sum(-1) + (1 - beta) * _masked_mul(ps, ls - lm).sum(-1)
    rows = alpha * T * T * d
    n_valid = rows.shape[0]
    if labels is not None:
        lab = labels.reshape(-1)
        valid = lab != ignore_index
        n_valid = int(valid.sum())
        if alpha != 1:
            ce = F.cross_entropy(s2, torch.where(valid, lab, 0), reduction="none")
            rows = rows + (1 - alpha) * ce
        rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype))
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / max(n_valid, 1)
    if feature_weight:
        h = student_features.shape[-1]
        sq = (student_features.reshape(-1, h) - teacher_features.reshape(-1, h)) ** 2
        out = out + feature_weight * (sq.mean(-1) if reduction == "none" else sq.mean())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def make_inputs(n, v, dtype=torch.float32, *, scale=3.0, seed=0, ignored=(), lead=None):
    """Scaled randn logits (never zeros), a correlated teacher, labels with some rows ignored."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * scale).to(dtype)
    t = (s.float() * 0.5 + torch.randn(n, v, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    for i in ignored:
        labels[i] = -100
    if lead is not None:
        s, t, labels = s.reshape(*lead, v), t.reshape(*lead, v), labels.reshape(lead)
    return s, t, labels


def case_features(n, dtype, feats: bool):
    """A value case's features: (fs, ft) (n, 24) and {"feature_weight": 0.3}, or (None, None, {}) without."""
    if not feats:
        return None, None, {}
    g = torch.Generator().manual_seed(1)
    fs, ft = (torch.randn(n, 24, generator=g) * 2).to(dtype), (torch.randn(n, 24, generator=g) * 2).to(dtype)
    return fs, ft, {"feature_weight": 0.3}


def assert_close_rel(actual, expected, rtol, what):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), f"{what}: inf pattern differs"
    fin = torch.isfinite(expected)
    if not fin.any():
        return
    err = (actual[fin] - expected[fin]).abs().max().item()
    ref = expected[fin].abs().max().item()
    assert err <= rtol * max(ref, 1e-30), f"{what}: max abs err {err:.3g} > {rtol:g} * {ref:.3g}"


def check(impl, s, t, labels=None, *, go=None, fs=None, ft=None, **kw):
    """Run kd_loss (through the dispatcher) and the oracle on the same rounded inputs; compare values and grads.

    go: the upstream gradient; defaults to 3.7 (scalar) or a random vector ('none'), so grad_output != 1.
    """
    dev = device_for(impl)
    dtype = s.dtype
    s_in = s.detach().to(dev).requires_grad_()
    t_in = t.detach().to(dev)
    lab_in = labels.to(dev) if labels is not None else None
    fs_in = fs.detach().to(dev).requires_grad_() if fs is not None else None
    ft_in = ft.detach().to(dev) if ft is not None else None
    out = kd_loss(s_in, t_in, lab_in, student_features=fs_in, teacher_features=ft_in, **kw)

    s64 = s.detach().double().requires_grad_()
    fs64 = fs.detach().double().requires_grad_() if fs is not None else None
    exp = oracle(
        s64, t.double(), labels, student_features=fs64, teacher_features=None if ft is None else ft.double(), **kw
    )
    if go is None:
        scalar = exp.dim() == 0
        go = torch.tensor(3.7, dtype=torch.float64) if scalar else torch.rand(exp.shape, dtype=torch.float64) + 0.5
    assert out.dtype == torch.float32
    assert_close_rel(out, exp, LOSS_RTOL[dtype], "loss")
    (out * go.to(out.device, out.dtype)).sum().backward()
    (exp * go).sum().backward()
    assert s_in.grad.dtype == dtype and s_in.grad.shape == s.shape
    assert_close_rel(s_in.grad, s64.grad, GRAD_RTOL[dtype], "grad student_logits")
    if fs is not None and kw.get("feature_weight", 0.0):
        assert_close_rel(fs_in.grad, fs64.grad, GRAD_RTOL[fs.dtype], "grad student_features")
    return out.detach().cpu(), s_in.grad.detach().cpu()
