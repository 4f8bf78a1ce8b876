"""pytest-benchmark checks for the loss against a cached top-k teacher, group "top_k_kd_loss": forward + backward of
kd_loss against the dense teacher logits, and of top_k_kd_loss against the teacher's top-k (bucket and uniform
tails), on the same student logits. What the cache saves, the teacher's forward pass, is not in these numbers;
what it costs in the loss is.

CI smoke run: pytest tests/bench -p no:randomly --benchmark-disable.
"""

from __future__ import annotations

import pytest
import torch

from kdbench.kernels import kd_loss, teacher_top_k, top_k_kd_loss

CUDA = torch.cuda.is_available()
TEMPERATURE = 2.0


def _inputs(n, v, k, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    s = (torch.randn(n, v, device=device, generator=g) * 2).to(dtype).requires_grad_()
    t = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    return s, t, teacher_top_k(t, k, temperature=TEMPERATURE), labels


LOSSES = {
    "kd_loss (dense teacher)": lambda s, t, top, y: kd_loss(s, t, y, temperature=TEMPERATURE, alpha=0.5),
    "top_k_kd_loss (bucket)": lambda s, t, top, y: top_k_kd_loss(s, *top, y, temperature=TEMPERATURE, alpha=0.5),
    "top_k_kd_loss (uniform)": lambda s, t, top, y: top_k_kd_loss(s, *top, y, temperature=TEMPERATURE, alpha=0.5,
                                                                  tail="uniform"),
}


def _step(fn, s, t, top, y):
    s.grad = None
    loss = fn(s, t, top, y)
    loss.backward()
    if s.is_cuda:
        torch.cuda.synchronize()
    return loss.detach()


def _check(benchmark, monkeypatch, name, inputs, rtol):
    s, t, top, y = inputs
    loss = benchmark(_step, LOSSES[name], *inputs)
    grad = s.grad.clone()
    # the same loss in float64 from the same (rounded) inputs, on the reference path
    monkeypatch.setenv("KDBENCH_KERNEL", "torch")
    exact = s.detach().double().requires_grad_()
    want = _step(LOSSES[name], exact, t.double(), (top[0].double(), top[1]), y)
    for got, ref in ((loss, want), (grad, exact.grad)):
        assert float((got.double() - ref).abs().max() / ref.abs().max()) < rtol


@pytest.mark.benchmark(group="top_k_kd_loss")
@pytest.mark.parametrize("name", list(LOSSES))
def test_top_k_kd_loss_cpu(benchmark, monkeypatch, name):
    monkeypatch.setenv("KDBENCH_KERNEL", "torch")
    _check(benchmark, monkeypatch, name, _inputs(1024, 8192, 32, torch.float32, "cpu"), rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.benchmark(group="top_k_kd_loss")
@pytest.mark.parametrize("name", list(LOSSES))
def test_top_k_kd_loss_gpu(benchmark, monkeypatch, name):
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    _check(benchmark, monkeypatch, name, _inputs(8192, 128256, 64, torch.bfloat16, "cuda"), rtol=2e-2)
