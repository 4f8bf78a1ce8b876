"""fused_linear_kd_loss: kd_loss of F.linear logits, chunk by chunk, against kd_loss on the whole logits.

The oracle is the unfused composition in float64 with autograd: kd_loss(F.linear(hs, ws, bs), F.linear(ht, wt,
bt), labels). The fused function must give the same loss and the same gradients for the student's hidden states,
weight and bias, whatever the chunking.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdbench.kernels import KdLossInputError, fused_linear_kd_loss, kd_loss
from kdbench.kernels import fused_linear

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: -inf - -inf


def make(n=12, h=6, ht=5, v=23, *, dtype=torch.float64, lead=None, bias=True, seed=0, ignore=(1, 7)):
    g = torch.Generator().manual_seed(seed)
    shape = lead or (n,)
    hs = torch.randn(*shape, h, generator=g, dtype=dtype, requires_grad=True)
    ws = (torch.randn(v, h, generator=g, dtype=dtype) * 2).requires_grad_(True)
    bs = torch.randn(v, generator=g, dtype=dtype).requires_grad_(True) if bias else None
    th = torch.randn(*shape, ht, generator=g, dtype=dtype)
    tw = torch.randn(v, ht, generator=g, dtype=dtype) * 2
    tb = torch.randn(v, generator=g, dtype=dtype) if bias else None
    labels = torch.randint(0, v, shape, generator=g)
    flat = labels.view(-1)
    for i in ignore:
        if i < flat.numel():
            flat[i] = -100
    return hs, ws, bs, th, tw, tb, labels


def grads(loss, *leaves):
    return torch.autograd.grad(loss, [x for x in leaves if x is not None])


def unfused(hs, ws, bs, th, tw, tb, labels, **kw):
    return kd_loss(F.linear(hs, ws, bs), F.linear(th, tw, tb), labels, **kw)


def fused(hs, ws, bs, th, tw, tb, labels, **kw):
    return fused_linear_kd_loss(hs, ws, th, tw, labels, student_bias=bs, teacher_bias=tb, **kw)


def assert_same(a, b, rtol=1e-10):
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()), 1e-30)
    assert float((a - b).abs().max()) / scale <= rtol, (a, b)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_rows", [1, 5, None, 64])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_matches_kd_loss_on_the_whole_logits(divergence, chunk_rows, reduction):
    args = make()
    kw = dict(temperature=2.0, alpha=0.7, divergence=divergence, beta=0.3, reduction=reduction)
    want = unfused(*args, **kw)
    got = fused(*args, chunk_rows=chunk_rows, **kw)
    assert_same(got, want)
    hs, ws, bs = args[:3]
    for g_got, g_want in zip(grads(got, hs, ws, bs), grads(want, hs, ws, bs)):
        assert_same(g_got, g_want)


def test_batched_input_without_bias_or_labels_and_grad_output():
    args = make(lead=(2, 5), bias=False)
    kw = dict(temperature=4.0, alpha=1.0)
    hs, ws = args[0], args[1]
    args = (*args[:6], None)
    want = unfused(*args, **kw) * 3.5
    got = fused(*args, chunk_rows=3, **kw) * 3.5
    assert_same(got, want)
    for g_got, g_want in zip(grads(got, hs, ws), grads(want, hs, ws)):
        assert g_got.shape == g_want.shape
        assert_same(g_got, g_want)


def test_all_rows_ignored_gives_zero_loss_and_gradients():
    hs, ws, bs, th, tw, tb, labels = make(n=4)
    labels[:] = -100
    loss = fused(hs, ws, bs, th, tw, tb, labels, chunk_rows=2)
    assert float(loss) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads(loss, hs, ws, bs))


def test_no_chunk_holds_more_than_chunk_rows_rows_of_logits(monkeypatch):
    seen = []
    real = F.linear

    def spy(x, w, b=None):
        out = real(x, w, b)
        seen.append(out.shape)
        return out

    monkeypatch.setattr(fused_linear.F, "linear", spy)
    hs, ws, bs, th, tw, tb, labels = make(n=11)
    fused(hs, ws, bs, th, tw, tb, labels, chunk_rows=4).backward()
    assert seen and max(shape[0] for shape in seen) == 4
    assert sum(shape[0] for shape in seen) == 2 * 11  # every row once per model, forward and backward together


def test_default_chunk_rows_keeps_a_chunk_near_the_hidden_states_size_with_a_floor_per_device():
    rows = fused_linear.default_chunk_rows
    assert rows(65536, 4096, 128256, "cuda") == 2048  # N H / V = 2093 -> 2048
    assert rows(8192, 2048, 128256, "cuda") == 2048  # N H / V = 130: the GPU's floor
    assert rows(8192, 2048, 128256, "cpu") == 256  # the CPU's floor
    assert rows(1 << 20, 1024, 4096, "cpu") == 1 << 18  # N H / V = 262144
    assert rows(4000, 768, 50257, "cpu") == 256
    assert rows(300, 768, 50257, "cpu") == 256
    assert rows(10, 4, 1000, "cuda") == 10  # at most N: one chunk


def test_without_grad_no_gradient_is_computed(monkeypatch):
    hs, ws, bs, th, tw, tb, labels = make()
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        loss = fused(hs, ws, bs, th, tw, tb, labels)
    assert_same(loss, unfused(hs, ws, bs, th, tw, tb, labels).detach())
    assert not calls


def test_teacher_gets_no_gradient():
    hs, ws, bs, th, tw, tb, labels = make()
    th.requires_grad_(True)
    tw.requires_grad_(True)
    fused(hs, ws, bs, th, tw, tb, labels).backward()
    assert th.grad is None and tw.grad is None and ws.grad is not None


def test_bf16_autocast_follows_the_unfused_composition():
    hs, ws, bs, th, tw, tb, labels = make(n=16, h=8, ht=8, v=40, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = unfused(hs, ws, bs, th, tw, tb, labels, temperature=2.0)
        got = fused(hs, ws, bs, th, tw, tb, labels, temperature=2.0, chunk_rows=5)
    assert_same(got, want, rtol=1e-5)  # same bf16 logits, fp32 loss
    for g_got, g_want in zip(grads(got, hs, ws, bs), grads(want, hs, ws, bs)):
        assert g_got.dtype == torch.float32
        assert_same(g_got, g_want, rtol=2e-2)  # bf16 gradients, rounded per chunk here and once there


def test_runs_the_triton_kernel_per_chunk(monkeypatch):
    """Under KDBENCH_KERNEL=triton (the interpreter without CUDA) each chunk goes through the Triton kernel."""
    import importlib

    kernel = importlib.import_module("kdbench.kernels.kd_loss_triton")
    launches = []
    real_forward = kernel.kd_loss_forward
    monkeypatch.setattr(kernel, "kd_loss_forward", lambda *a: launches.append(a[0].shape[0]) or real_forward(*a))
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    *tensors, labels = make(n=10, h=4, ht=3, v=37)
    hs, ws, bs, th, tw, tb = (t.detach().float().to(device).requires_grad_(t.requires_grad) for t in tensors)
    labels = labels.to(device)
    got = fused(hs, ws, bs, th, tw, tb, labels, temperature=2.0, chunk_rows=4)
    assert launches == [4, 4, 2]
    monkeypatch.setenv("KDBENCH_KERNEL", "torch")
    want = unfused(hs, ws, bs, th, tw, tb, labels, temperature=2.0)
    assert_same(got, want, rtol=1e-5)
    for g_got, g_want in zip(grads(got, hs, ws, bs), grads(want, hs, ws, bs)):
        assert_same(g_got, g_want, rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "th": a["th"][:5]}, "differ in their leading dims"),
    (lambda a: {**a, "ws": a["ws"][:, :3]}, "student_weight must be (V, 6)"),
    (lambda a: {**a, "tw": a["tw"][:20]}, "teacher's output layer has 20 rows and the student's 23"),
    (lambda a: {**a, "bs": a["bs"][:4]}, "student_bias must be (23,)"),
    (lambda a: {**a, "labels": a["labels"][:3]}, "labels shape (3,)"),
    (lambda a: {**a, "hs": a["hs"][0]}, "hidden states must be (N, H)"),
    (lambda a: {**a, "reduction": "none"}, "reduction must be 'batchmean' or 'sum'"),
    (lambda a: {**a, "chunk_rows": 0}, "chunk_rows must be a positive integer"),
    (lambda a: {**a, "tw": a["tw"].long()}, "teacher_weight must be a floating-point tensor"),
])
def test_bad_arguments_get_one_line_errors(change, message):
    hs, ws, bs, th, tw, tb, labels = make()
    a = change(dict(hs=hs, ws=ws, bs=bs, th=th, tw=tw, tb=tb, labels=labels, reduction="batchmean", chunk_rows=None))
    with pytest.raises(KdLossInputError) as err:
        fused_linear_kd_loss(a["hs"], a["ws"], a["th"], a["tw"], a["labels"], student_bias=a["bs"],
                             teacher_bias=a["tb"], reduction=a["reduction"], chunk_rows=a["chunk_rows"])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_kd_loss_argument_errors_still_come_from_kd_loss():
    hs, ws, bs, th, tw, tb, labels = make()
    with pytest.raises(KdLossInputError, match="unknown divergence"):
        fused(hs, ws, bs, th, tw, tb, labels, divergence="tvd")


def test_loss_options_are_kd_losss_and_no_others():
    """The loss options take kd_loss's defaults (help() shows them); kd_loss's feature options are refused."""
    import inspect

    params = inspect.signature(fused_linear_kd_loss).parameters
    assert {name: params[name].default for name in fused_linear.LOSS_OPTIONS} == {
        name: inspect.signature(kd_loss).parameters[name].default for name in fused_linear.LOSS_OPTIONS}
    hs, ws, bs, th, tw, tb, labels = make()
    with pytest.raises(KdLossInputError, match="^fused_linear_kd_loss: unknown argument[(]s[)] feature_weight$"):
        fused(hs, ws, bs, th, tw, tb, labels, feature_weight=0.5)
    assert_same(fused(hs, ws, bs, th, tw, tb, labels), unfused(hs, ws, bs, th, tw, tb, labels))
