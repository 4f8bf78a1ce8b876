"""kd_loss's values and gradients, the Triton kernel and the PyTorch reference each against a float64 autograd
oracle (kd_oracle.py); grids stay at 64 rows or fewer. With CUDA the same tests run the compiled kernel, and the
`gpu` tests add large shapes. The front's errors, docs and dispatch: test_kd_loss_front.py.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from kd_oracle import (BF16, CUDA, F16, F32, assert_close_rel, case_features, check, device_for, impl,  # noqa: F401
                       make_inputs, oracle)
from sm90_build import build_for_sm90
from kdbench.kernels import KdLossInputError, kd_loss
from kdbench.kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: -inf - -inf


@pytest.fixture
def tiled(monkeypatch):
    """Force the kernel's multi-tile (online softmax) path at small V."""
    kmod = importlib.import_module("kdbench.kernels.kd_loss_triton")
    # The tests that take this fixture call check("triton", ...) without the `impl` fixture: without this, a CPU
    # run went through the dispatcher's default and quietly tested the reference (so it did until 2026-11-28).
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    monkeypatch.setattr(kmod, "MAX_FUSED_V", 64)
    monkeypatch.setattr(kmod, "INTERPRET_BLOCK_V", 256)


# ----------------------------------------------------------------------------------------------------------------
# Values and gradients
# ----------------------------------------------------------------------------------------------------------------

# (dtype, N, V, T, alpha, divergence, reduction, features): a spread over the axes, not their product.
CASES = [
    pytest.param(F32, 16, 1000, 4.0, 0.7, "forward_kl", "batchmean", False, id="fp32-V1000-T4-fwd-mean"),
    pytest.param(F32, 16, 1000, 1.0, 0.7, "reverse_kl", "sum", True, id="fp32-V1000-T1-rev-sum-feat"),
    pytest.param(F32, 16, 1000, 0.5, 0.7, "jsd", "none", True, id="fp32-V1000-T0.5-jsd-none-feat"),
    pytest.param(F32, 8, 2, 4.0, 0.0, "forward_kl", "batchmean", False, id="fp32-V2-alpha0"),
    pytest.param(F32, 8, 2, 0.5, 1.0, "reverse_kl", "none", False, id="fp32-V2-alpha1-rev-none"),
    pytest.param(F32, 1, 4097, 16.0, 1.0, "jsd", "batchmean", False, id="fp32-V4097-onerow-T16-jsd"),
    pytest.param(BF16, 8, 1000, 4.0, 0.7, "forward_kl", "batchmean", True, id="bf16-V1000-fwd-feat"),
    pytest.param(BF16, 4, 4097, 1.0, 0.5, "jsd", "sum", False, id="bf16-V4097-T1-jsd-sum"),
    pytest.param(F16, 8, 1000, 16.0, 0.7, "reverse_kl", "batchmean", False, id="fp16-V1000-T16-rev"),
    pytest.param(F16, 2, 50257, 4.0, 0.7, "forward_kl", "batchmean", False, id="fp16-V50257-fwd"),
    pytest.param(BF16, 2, 50257, 1.0, 0.5, "reverse_kl", "none", False, id="bf16-V50257-T1-rev-none"),
    pytest.param(F32, 2, 50257, 0.5, 0.7, "jsd", "sum", False, id="fp32-V50257-T0.5-jsd"),
]


@pytest.mark.parametrize("dtype,n,v,T,alpha,div,red,feats", CASES)
def test_matches_float64(impl, dtype, n, v, T, alpha, div, red, feats):
    # Logits grow with T so the soft targets stay informative (KL of order 1e-2 or more at T=16).
    s, t, labels = make_inputs(n, v, dtype, scale=3.0 * max(1.0, T / 4), ignored=(1,) if n > 2 else ())
    fs, ft, fw = case_features(n, dtype, feats)
    check(impl, s, t, labels, fs=fs, ft=ft, temperature=T, alpha=alpha, divergence=div, reduction=red, **fw)


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("T,alpha", [(4.0, 0.7), (1.0, 0.3)])
def test_tiled_path_matches_float64(tiled, div, T, alpha):
    """The online-softmax path (V > MAX_FUSED_V), several tiles and a ragged last one, at interpreter-sized V."""
    s, t, labels = make_inputs(6, 1000, ignored=(2,))
    check("triton", s, t, labels, temperature=T, alpha=alpha, divergence=div, reduction="batchmean")


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_tiled_path_extreme_alpha(tiled, alpha):
    s, t, labels = make_inputs(4, 600, BF16, ignored=(0,))
    check("triton", s, t, labels, temperature=2.0, alpha=alpha, reduction="sum")


class LaunchSpy:
    """Stands in for a kernel (plain or autotuned): records each launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getattr__(self, name):  # the rest of the kernel's interface (an autotuner's configs)
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("warps", [1, 2])
def test_whole_rows_at_fewer_warps_match_float64(monkeypatch, warps):
    """SINGLE_WARPS (a benchmark candidate): every whole-row launch at that many warps, still exact."""
    kmod = importlib.import_module("kdbench.kernels.kd_loss_triton")
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    monkeypatch.setattr(kmod, "SINGLE_WARPS", warps)
    spy = LaunchSpy(kmod._kd_loss_fwd_kernel)
    monkeypatch.setattr(kmod, "_kd_loss_fwd_kernel", spy)
    s, t, labels = make_inputs(8, 1000, ignored=(3,))
    check("triton", s, t, labels, temperature=2.0, alpha=0.7, divergence="reverse_kl")
    assert [c["num_warps"] for c in spy.calls] == [warps]


def test_precompiled_launches_are_the_ones_kd_loss_makes(monkeypatch):
    """The benchmark compiles the tiled kernel's autotune configs in parallel before timing it: every config with
    exactly the arguments and settings of kd_loss's own launch, only BLOCK_V and the warps differing. On a GPU the
    planned compiles also run (Triton's warmup)."""
    kmod = importlib.import_module("kdbench.kernels.kd_loss_triton")
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    monkeypatch.setattr(kmod, "MAX_FUSED_V", 64)
    spies = [LaunchSpy(kmod._kd_loss_fwd_kernel), LaunchSpy(kmod._fwd_tiled)]  # the interpreter's, the autotuner's
    monkeypatch.setattr(kmod, "_kd_loss_fwd_kernel", spies[0])
    monkeypatch.setattr(kmod, "_fwd_tiled", spies[1])
    dev = device_for("triton")
    s, t, labels = make_inputs(4, 701, BF16)
    s, t, labels = s.to(dev).requires_grad_(), t.to(dev), labels.to(dev)
    kd_loss(s, t, labels, temperature=2.0, alpha=0.5).backward()
    [launched] = spies[0].calls + spies[1].calls
    planned = kmod._tiled_launches(s, t, labels, temperature=2.0, alpha=0.5)
    configs = spies[1].kernel.configs
    assert len(planned) == len(configs) >= 4
    tuned = {"grid", "BLOCK_V", "num_warps", "num_ctas", "num_stages"}
    for (args, kwargs), config in zip(planned, configs):
        assert {k: v for k, v in kwargs.items() if k not in tuned} == {
            k: v for k, v in launched.items() if k not in tuned}
        assert (kwargs["BLOCK_V"], kwargs["num_warps"], kwargs["grid"]) == (
            config.kwargs["BLOCK_V"], config.num_warps, (4,))
        assert args[0].shape == (4, 701) and torch.equal(args[6], labels) and args[7] == BF16  # the grad: a dtype
    thunks = kmod.precompile_tiled(s, t, labels, temperature=2.0, alpha=0.5)
    if CUDA:
        assert len(thunks) == len(configs)
        for thunk in thunks:
            thunk()  # compiles without launching
    else:
        assert thunks == []  # CPU tensors: nothing to compile
    assert kmod._tiled_launches(s[:, :60], t[:, :60], labels % 60) == []  # whole rows: no autotuner


@pytest.mark.parametrize("T", [0.1, 100.0])
def test_extreme_temperatures(impl, T):
    s, t, labels = make_inputs(8, 300, scale=3.0 * max(1.0, T / 4))
    check(impl, s, t, labels, temperature=T, alpha=0.7, divergence="forward_kl")


def test_labels_none_all_rows_valid_and_no_ce(impl):
    s, t, _ = make_inputs(8, 100)
    out, _ = check(impl, s, t, None, temperature=2.0, alpha=0.7, divergence="reverse_kl")
    # (1 - alpha) weights nothing: the loss is exactly alpha * T^2 * D averaged over all rows.
    soft = oracle(s.double(), t.double(), None, temperature=2.0, alpha=1.0, divergence="reverse_kl")
    assert out.item() == pytest.approx(0.7 * soft.item(), rel=1e-5)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_all_ignored_batch_is_zero_with_zero_grads(impl, reduction):
    s, t, labels = make_inputs(4, 300, ignored=range(4))
    s = s.to(device_for(impl)).requires_grad_()
    out = kd_loss(s, t.to(s.device), labels.to(s.device), temperature=2.0, reduction=reduction)
    assert torch.equal(out.detach().cpu(), torch.zeros_like(out.detach().cpu()))
    out.sum().backward()
    assert torch.equal(s.grad.cpu(), torch.zeros_like(s.grad.cpu()))


def test_ignored_rows_drop_out(impl):
    """An ignored row contributes nothing, even when it holds NaN (padding); batchmean divides by valid rows."""
    s, t, labels = make_inputs(6, 200, ignored=(0, 4))
    s_nan, t_nan = s.clone(), t.clone()
    s_nan[4] = float("nan")
    t_nan[0] = float("-inf")
    dev = device_for(impl)
    a = s_nan.to(dev).requires_grad_()
    out = kd_loss(a, t_nan.to(dev), labels.to(dev), temperature=2.0, alpha=0.6)
    keep = torch.tensor([1, 2, 3, 5])
    exp = oracle(s[keep].double(), t[keep].double(), labels[keep], temperature=2.0, alpha=0.6)
    assert out.item() == pytest.approx(exp.item(), rel=1e-5)
    out.backward()
    assert torch.isfinite(a.grad).all() and not a.grad[[0, 4]].any()


def test_grad_output_scales_gradient(impl):
    s, t, labels = make_inputs(4, 500, ignored=(3,))
    dev = device_for(impl)
    grads = []
    for go in (1.0, 3.7, 0.0):
        a = s.clone().to(dev).requires_grad_()
        (kd_loss(a, t.to(dev), labels.to(dev), temperature=4.0, alpha=0.7) * go).backward()
        grads.append(a.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0] * 3.7, rtol=1e-5, atol=1e-7)
    assert not grads[2].any()


def test_second_backward_with_scaled_grad_output_raises(impl):
    s, t, labels = make_inputs(2, 50)
    a = s.to(device_for(impl)).requires_grad_()
    loss = kd_loss(a, t.to(a.device), labels.to(a.device)) * 2.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_3d_input_with_features(impl):
    s, t, labels = make_inputs(12, 300, BF16, ignored=(5,), lead=(3, 4))
    g = torch.Generator().manual_seed(3)
    fs, ft = torch.randn(3, 4, 16, generator=g), torch.randn(3, 4, 16, generator=g)
    out, grad = check(impl, s, t, labels, fs=fs, ft=ft, temperature=2.0, alpha=0.5, feature_weight=0.5)
    assert out.dim() == 0 and grad.shape == (3, 4, 300)


def test_features_rows_differ_from_logit_rows(impl):
    """Scalar reductions accept M != N feature rows (e.g. pooled features); 'none' refuses them."""
    s, t, labels = make_inputs(6, 100)
    g = torch.Generator().manual_seed(4)
    fs, ft = torch.randn(2, 40, generator=g), torch.randn(2, 40, generator=g)
    check(impl, s, t, labels, fs=fs, ft=ft, temperature=2.0, feature_weight=2.0, reduction="sum")
    with pytest.raises(KdLossInputError, match="one feature row per logit row"):
        kd_loss(s, t, labels, student_features=fs, teacher_features=ft, feature_weight=2.0, reduction="none")


@pytest.mark.parametrize("use_tiled", [False, True])
@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_neg_inf_logits(impl, request, use_tiled, div):
    """Masked vocabulary: -inf entries give no NaN. The teacher alone may mask for forward KL; for reverse KL and
    JSD both mask the same entries (a student mass where p_t = 0 makes reverse KL truly infinite)."""
    if use_tiled:
        if impl == "torch":
            pytest.skip("the tiled path is a kernel detail")
        request.getfixturevalue("tiled")
    s, t, labels = make_inputs(5, 700, ignored=(1,))
    t[:, ::7] = float("-inf")
    t[0, 300:] = float("-inf")  # a long masked run: whole tiles of -inf on the tiled path
    if div != "forward_kl":
        s[:, ::7] = float("-inf")
        s[0, 300:] = float("-inf")
        labels[labels % 7 == 0] = 1  # a label on a masked entry would make CE infinite
        labels[0] = 3
    check(impl, s, t, labels, temperature=2.0, alpha=0.7, divergence=div)


def test_infinite_forward_kl_is_inf_not_nan(impl):
    """p_t > 0 where the student says -inf: KL(p_t || p_s) is infinite, and reported as such."""
    s, t, _ = make_inputs(2, 10)
    s[0, 3] = float("-inf")
    dev = device_for(impl)
    out = kd_loss(s.to(dev), t.to(dev), None, alpha=1.0, reduction="none").cpu()
    assert out[0].item() == math.inf and math.isfinite(out[1].item())


def test_non_contiguous_inputs(impl):
    s, t, labels = make_inputs(8, 2 * 300)
    s_view = s[:, ::2]  # column stride 2
    t_view = t.t().contiguous().t()[:, :300]  # column-major
    assert not s_view.is_contiguous() and not t_view.is_contiguous()
    check(impl, s_view, t_view, labels % 300, temperature=2.0, alpha=0.7)


def test_causal_lm_shifted_views(impl):
    """What the Distiller hands over for a causal LM: (B, L - 1, V) views that drop each sequence's last position
    (not contiguous over rows), labels shifted by one, padding ignored; the last positions get zero gradient."""
    s, t, labels = make_inputs(3 * 7, 500, lead=(3, 7), ignored=(5, 6))
    s_view, t_view, y = s[:, :-1], t[:, :-1], labels[:, 1:]
    assert not s_view.is_contiguous()
    check(impl, s_view, t_view, y, temperature=2.0, alpha=0.9)
    dev = device_for(impl)
    full = s.detach().to(dev).requires_grad_()
    kd_loss(full[:, :-1], t.to(dev)[:, :-1], y.to(dev), temperature=2.0, alpha=0.9).backward()
    moved = full.grad[:, :-1].abs().sum(-1).cpu() > 0
    assert torch.all(full.grad[:, -1] == 0) and torch.equal(moved, y != -100)  # ignored positions get none either


def test_teacher_gets_no_grad(impl):
    s, t, labels = make_inputs(4, 64)
    dev = device_for(impl)
    a, b = s.to(dev).requires_grad_(), t.to(dev).requires_grad_()
    kd_loss(a, b, labels.to(dev), temperature=2.0).backward()
    assert a.grad is not None and b.grad is None


def test_no_grad_forward_matches(impl):
    s, t, labels = make_inputs(4, 64)
    dev = device_for(impl)
    with torch.no_grad():
        out = kd_loss(s.to(dev).requires_grad_(), t.to(dev), labels.to(dev), temperature=2.0, divergence="jsd")
    exp = oracle(s.double(), t.double(), labels, temperature=2.0, divergence="jsd")
    assert out.item() == pytest.approx(exp.item(), rel=1e-5)


def test_pinned_hand_computed_values(impl):
    """V = 2, s = [0, 0] (p_s = [1/2, 1/2]), t = [log 3, 0] (p_t = [3/4, 1/4]), T = 1, by hand:
    KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120;  KL(p_s || p_t) = 1/2 ln(2/3) + 1/2 ln 2 = 0.1438410;
    CE(label 0) = ln 2;  d forward_kl / ds = p_s - p_t = [-1/4, 1/4]."""
    dev = device_for(impl)
    s = torch.zeros(1, 2, device=dev) + torch.tensor([[0.0, 0.0]], device=dev)
    t = torch.tensor([[math.log(3.0), 0.0]], device=dev)
    lab = torch.tensor([0], device=dev)
    a = s.clone().requires_grad_()
    fwd = kd_loss(a, t, lab, alpha=1.0)
    fwd.backward()
    assert fwd.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-7)
    assert fwd.item() == pytest.approx(0.1308120, abs=1e-6)
    torch.testing.assert_close(a.grad.cpu(), torch.tensor([[-0.25, 0.25]]))
    rev = kd_loss(s, t, lab, alpha=1.0, divergence="reverse_kl")
    assert rev.item() == pytest.approx(0.1438410, abs=1e-6)
    ce = kd_loss(s, t, lab, alpha=0.0)
    assert ce.item() == pytest.approx(math.log(2.0), abs=1e-7)
    # T^2 on the soft term only: alpha=0.5, T=2 -> 0.5 * 4 * KL(softmax(t/2) || [1/2, 1/2]) + 0.5 * ln 2
    pt = torch.softmax(torch.tensor([math.log(3.0) / 2, 0.0], dtype=torch.float64), 0)
    kl = float((pt * (pt.log() - math.log(0.5))).sum())
    mixed = kd_loss(s, t, lab, alpha=0.5, temperature=2.0)
    assert mixed.item() == pytest.approx(0.5 * 4 * kl + 0.5 * math.log(2.0), abs=1e-6)


def test_reference_chunking_is_exact(monkeypatch):
    """The reference walks rows in chunks; tiny chunks give the same numbers."""
    s, t, labels = make_inputs(10, 300, ignored=(4,))
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 900)  # 3 rows per chunk, ragged last chunk
    check("torch", s, t, labels, temperature=2.0, alpha=0.7, divergence="jsd", reduction="batchmean")


def test_mixed_teacher_dtype(impl):
    s, _, labels = make_inputs(4, 300)
    _, t, _ = make_inputs(4, 300, BF16, seed=5)
    check(impl, s, t, labels, temperature=2.0, alpha=0.7)


# ----------------------------------------------------------------------------------------------------------------
# GPU only: real shapes, and int64 offsets past 2^31 elements
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_gpu_large_vocab_against_reference(monkeypatch, dtype, div):
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    s, t, labels = make_inputs(256, 128256, dtype, ignored=(3, 100))
    check("triton", s, t, labels, temperature=2.0, alpha=0.7, divergence=div)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """N * V > 2^31: rows past the 2^31-th element must be right (checks the last rows against the oracle)."""
    n, v = 16800, 128256  # 2.15e9 elements, 4.3 GB per bf16 tensor
    g = torch.Generator(device="cuda").manual_seed(0)
    s = (torch.randn(n, v, device="cuda", generator=g) * 3).to(BF16).requires_grad_()
    t = (torch.randn(n, v, device="cuda", generator=g) * 3).to(BF16)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    kmod = importlib.import_module("kdbench.kernels.kd_loss_triton")
    out = kmod.kd_loss(s, t, labels, temperature=2.0, alpha=0.7, reduction="none")
    out.sum().backward()
    tail = slice(n - 4, n)
    s64 = s.detach()[tail].double().cpu().requires_grad_()
    exp = oracle(s64, t[tail].double().cpu(), labels[tail].cpu(), temperature=2.0, alpha=0.7, reduction="none")
    exp.sum().backward()
    assert_close_rel(out[tail], exp, 1e-4, "tail row losses")
    assert_close_rel(s.grad[tail], s64.grad, 1e-2, "tail grads")


def test_alpha0_without_labels_is_zero(impl):
    """No CE term and no soft term: the loss is 0 and so is the gradient (the kernel has nothing to compute)."""
    s, t, _ = make_inputs(3, 50)
    a = s.clone().to(device_for(impl)).requires_grad_()
    out = kd_loss(a, t.to(a.device), None, alpha=0.0)
    assert out.item() == 0.0
    out.backward()
    assert not a.grad.any()


# ----------------------------------------------------------------------------------------------------------------
# Compiles for the GPU without one: catches what the interpreter lets through (e.g. non-constexpr globals)
# ----------------------------------------------------------------------------------------------------------------


_COMPILE_SCRIPT = r"""
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

fn = importlib.import_module("kdbench.kernels.kd_loss_jit")._kd_loss_fwd_kernel
# dtype, divergence, single (whole row in registers), has_labels, alpha
variants = [
    ("bf16", 0, True, True, 0.5), ("fp16", 1, False, True, 0.5), ("fp32", 2, False, False, 1.0),
    ("bf16", 2, True, True, 0.0), ("fp32", 0, True, False, 0.0), ("bf16", 1, False, True, 0.5),
    ("fp32", 0, True, True, 0.5), ("bf16", 2, False, True, 0.5),
]
for dtype, divergence, single, has_labels, alpha in variants:
    consts = dict(
        s_stride_v=1, t_stride_v=1, DIVERGENCE=divergence, HAS_LABELS=has_labels, DO_SOFT=alpha != 0.0,
        DO_CE=has_labels and alpha != 1.0, SAME_T=False, WRITE_GRAD=True, SINGLE=single,
        BLOCK_V=8192 if single else 4096,
        HAS_FEATURES=divergence == 1, WRITE_FGRAD=divergence == 1, BLOCK_H=1024,  # the feature MSE in the launch
    )
    types = dict(
        s_ptr=f"*{dtype}", t_ptr=f"*{dtype}", lab_ptr="*i64", grad_ptr=f"*{dtype}", loss_ptr="*fp32",
        scale_ptr="*fp32", s_stride_r="i64", t_stride_r="i64", V="i32", inv_T="fp32", T="fp32", alpha="fp32",
        beta="fp32", log_beta="fp32", log_1m_beta="fp32", ignore_index="i32",
        fs_ptr=f"*{dtype}", fs_stride_r="i64", fs_stride_h="i64", ft_ptr=f"*{dtype}", ft_stride_r="i64",
        ft_stride_h="i64", fgrad_ptr=f"*{dtype}", sq_ptr="*fp32", N="i32", H="i32", f_coef="fp32",
    )
    sig = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
    out = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 16})
    assert out.asm["cubin"], (dtype, divergence, single)
print("compiled", len(variants))
"""


def test_kernel_compiles_for_sm90():
    """Compile the forward kernel to sm_90 machine code (Triton's bundled ptxas, no GPU needed)."""
    build_for_sm90(_COMPILE_SCRIPT, 8)
