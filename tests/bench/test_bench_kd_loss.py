"""pytest-benchmark checks for kd_loss, group "kd_loss": forward + backward, each one also checked against float64.

CI smoke run (each benchmark runs once, untimed):  pytest tests/bench -p no:randomly --benchmark-disable
GPU session, save a baseline:   pytest tests/bench -p no:randomly --benchmark-enable --benchmark-autosave
and compare with it later:      ... --benchmark-enable --benchmark-compare --benchmark-compare-fail=median:10%
The full comparison table (eager, torch.compile, Liger, ours; GB/s, memory) is kdbench.kernels.benchmark.bench_kernels.
"""

from __future__ import annotations

import pytest
import torch

from kdbench.kernels.benchmark import ALPHA, TEMPERATURE, bench_kernels, eager_kd_loss, float64_check

CUDA = torch.cuda.is_available()


def _inputs(n, v, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    s = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype).requires_grad_()
    t = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    return s, t, labels


def _ours(s, t, labels):
    from kdbench.kernels import kd_loss

    return kd_loss(s, t, labels, temperature=TEMPERATURE, alpha=ALPHA)


def _step(fn, s, t, labels):
    s.grad = None
    loss = fn(s, t, labels)
    loss.backward()
    if s.is_cuda:
        torch.cuda.synchronize()  # pytest-benchmark reads a host clock
    return loss.detach()


def _run_and_check(benchmark, fn, s, t, labels, rtol):
    loss = benchmark(_step, fn, s, t, labels)
    err = float64_check(s, t, labels, loss, s.grad)
    assert err < rtol, f"max rel error vs float64 {err:.2e} >= {rtol:g}"


@pytest.mark.benchmark(group="kd_loss")
def test_kd_loss_reference_cpu(benchmark, monkeypatch):
    monkeypatch.setenv("KDBENCH_KERNEL", "torch")
    _run_and_check(benchmark, _ours, *_inputs(512, 4096, torch.float32, "cpu"), rtol=1e-5)


@pytest.mark.benchmark(group="kd_loss")
def test_eager_cpu(benchmark):
    _run_and_check(benchmark, eager_kd_loss, *_inputs(512, 4096, torch.float32, "cpu"), rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.benchmark(group="kd_loss")
@pytest.mark.parametrize("v", [32000, 128256], ids=["V32000-bf16", "V128256-bf16"])
def test_kd_loss_triton_gpu(benchmark, monkeypatch, v):
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    _run_and_check(benchmark, _ours, *_inputs(8192, v, torch.bfloat16, "cuda"), rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.benchmark(group="kd_loss")
def test_eager_gpu(benchmark):
    _run_and_check(benchmark, eager_kd_loss, *_inputs(8192, 32000, torch.bfloat16, "cuda"), rtol=1e-2)


def test_bench_kernels_writes_a_table(tmp_path):
    """bench_kernels end to end on tiny shapes: a markdown table with every implementation, written to disk."""
    table, page = bench_kernels(out_dir=tmp_path, shapes=[(64, 500, "float32")], quick=True)
    assert list(tmp_path.glob("*.md")) == [page] and page.read_text() == table
    assert "| 64 x 500 | float32 | eager |" in table
    assert "kd_loss (" in table and "failed" not in table and "OOM" not in table


def test_a_candidate_changes_the_kernel_settings_for_its_call_only(monkeypatch):
    """The table's candidate rows run kd_loss with kernels/kd_loss_triton.py settings changed, and put them back."""
    import importlib

    from kdbench.kernels import benchmark as bench

    kmod = importlib.import_module("kdbench.kernels.kd_loss_triton")
    seen = []
    monkeypatch.setattr(bench, "_ours", lambda s, t, labels: seen.append((kmod.SINGLE_WARPS, kmod.MAX_FUSED_V)))
    bench._ours_with(SINGLE_WARPS=2, MAX_FUSED_V=64)(None, None, None)
    assert seen == [(2, 64)] and (kmod.SINGLE_WARPS, kmod.MAX_FUSED_V) == (None, 8192)


def test_precompiling_collects_each_setting_and_survives_a_failed_compile(monkeypatch, caplog):
    import importlib
    import logging

    from kdbench.kernels import benchmark as bench

    kmod = importlib.import_module("kdbench.kernels.kd_loss_triton")
    ran = []

    def thunks(s, t, labels, **kw):  # one per "config", recording the settings they were planned under
        planned = kmod.SINGLE_WARPS

        def boom():
            raise RuntimeError("ptxas died")

        return [lambda: ran.append(planned), boom]

    monkeypatch.setattr(kmod, "precompile_tiled", thunks)
    with caplog.at_level(logging.WARNING, logger="kdbench.kernels.benchmark"):
        bench._precompile([{}, {"SINGLE_WARPS": 1}, {"SINGLE_WARPS": 2}], None, None, None)
    assert sorted(ran, key=str) == [1, 2, None]
    assert kmod.SINGLE_WARPS is None
    assert [r.getMessage() for r in caplog.records].count("kd_loss bench: precompiling failed: ptxas died") == 3


def test_each_candidate_is_timed_only_on_the_shapes_it_changes():
    import importlib

    from kdbench.kernels import benchmark as bench

    timed = {c.name: [v for v in (1000, 8192, 8193, 32000, 50257, 128256) if c.applies(v)] for c in bench.CANDIDATES}
    assert timed == {
        "kd_loss (triton, whole rows at 1 warp)": [1000, 8192],
        "kd_loss (triton, whole rows at 2 warps)": [1000, 8192],
    }
    kmod = importlib.import_module("kdbench.kernels.kd_loss_triton")
    assert all(hasattr(kmod, k) for c in bench.CANDIDATES for k in c.settings)  # no setting misspelt


def test_bench_kernels_command_writes_where_asked_and_shows_progress(tmp_path, monkeypatch):
    """`kdbench bench kernels --out FILE`: progress per shape and implementation on stderr, the table on stdout,
    and the file it wrote named."""
    from typer.testing import CliRunner

    from kdbench.cli import app
    from kdbench.kernels import benchmark as bench

    monkeypatch.setattr(bench, "CPU_QUICK_SHAPES", [(32, 300, "float32")])
    page = tmp_path / "pages" / "mine.md"
    result = CliRunner().invoke(app, ["bench", "kernels", "--quick", "--out", str(page)])
    assert result.exit_code == 0, result.output
    assert page.read_text().strip() in result.stdout
    assert "shape 1 of 1, 32 x 300 float32" in result.stderr and "eager:" in result.stderr
    assert f"written to {page}" in " ".join(result.stderr.split())


def test_bench_kernels_refuses_an_unwritable_page_before_timing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kdbench.cli import app

    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["bench", "kernels", "--quick", "--out", str(blocker / "x.md")])
    assert result.exit_code == 2 and "cannot write" in result.stderr and "shape" not in result.stderr
