"""pytest-benchmark checks for the loss from hidden states, group "fused_linear": the unfused composition (both
models' logits, then kd_loss) against fused_linear_kd_loss, forward + backward, each checked against the other.

CI smoke run: pytest tests/bench -p no:randomly --benchmark-disable. The table with peak memory is
kdbench.kernels.benchmark_fused_linear.bench_fused_linear (`kdbench bench fused-linear`).
"""

from __future__ import annotations

import pytest
import torch

from kdbench.kernels.benchmark_fused_linear import IMPLEMENTATIONS, bench_fused_linear

CUDA = torch.cuda.is_available()


def _inputs(n, h, ht, v, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    hs = torch.randn(n, h, device=device, generator=g).to(dtype).requires_grad_()
    ws = (torch.randn(v, h, device=device, generator=g) * h**-0.5).to(dtype).requires_grad_()
    ht_ = torch.randn(n, ht, device=device, generator=g).to(dtype)
    wt = (torch.randn(v, ht, device=device, generator=g) * ht**-0.5).to(dtype)
    return hs, ws, ht_, wt, torch.randint(0, v, (n,), device=device, generator=g)


def _step(fn, hs, ws, ht, wt, labels):
    hs.grad = ws.grad = None
    loss = fn(hs, ws, ht, wt, labels)
    loss.backward()
    if hs.is_cuda:
        torch.cuda.synchronize()
    return loss.detach()


def _check_against_unfused(benchmark, impl, inputs, rtol):
    fn = dict(IMPLEMENTATIONS)[impl]
    loss = benchmark(_step, fn, *inputs)
    got = (loss, inputs[0].grad.clone(), inputs[1].grad.clone())
    want = (_step(IMPLEMENTATIONS[0][1], *inputs), inputs[0].grad, inputs[1].grad)
    for a, b in zip(got, want):
        assert float((a.float() - b.float()).abs().max() / b.float().abs().max()) < rtol


@pytest.mark.benchmark(group="fused_linear")
@pytest.mark.parametrize("impl", [name for name, _ in IMPLEMENTATIONS])
def test_fused_linear_cpu(benchmark, monkeypatch, impl):
    monkeypatch.setenv("KDBENCH_KERNEL", "torch")
    _check_against_unfused(benchmark, impl, _inputs(256, 128, 192, 8192, torch.float32, "cpu"), rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.benchmark(group="fused_linear")
@pytest.mark.parametrize("impl", [name for name, _ in IMPLEMENTATIONS])
def test_fused_linear_gpu(benchmark, monkeypatch, impl):
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    _check_against_unfused(benchmark, impl, _inputs(8192, 2048, 4096, 128256, torch.bfloat16, "cuda"), rtol=2e-2)


def test_bench_fused_linear_writes_a_table(tmp_path):
    table, page = bench_fused_linear(out_dir=tmp_path, shapes=[(32, 16, 24, 300, "float32")], quick=True)
    assert list(tmp_path.glob("*.md")) == [page] and page.read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| 32 x 16 (teacher 24) x 300 |")]
    assert [r.split("|")[3].strip() for r in rows] == [name for name, _ in IMPLEMENTATIONS]
    assert "failed" not in table and "(itself)" in rows[0]
    assert float(rows[1].split("|")[6]) < 1e-5  # the fused row agrees with the unfused one
