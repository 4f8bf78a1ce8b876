"""The persistent kd_loss kernel (kernels/kd_loss_persistent.py) against the float64 reference.

Under the interpreter its grid is 3 programs, so each walks several rows through its software pipeline (the next
row's logits and the label after it loaded before the current row's math); N is rarely a multiple of the grid, and
ignored rows sit right after valid ones, so a pipeline slot that carried the wrong row, label or validity fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from kd_lean_cases import check, run, with_neg_inf
from kd_oracle import BF16, F16, F32, LOSS_RTOL, assert_close_rel, case_features, make_inputs
from sm90_build import build_for_sm90
from kdbench.kernels import kd_loss_persistent as persistent
from kdbench.kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: -inf - -inf

forward = persistent.kd_loss_forward

# (dtype, N, V, T, alpha, divergence, reduction, features): a spread over the axes, not their product.
CASES = [
    pytest.param(F32, 8, 1000, 2.0, 0.5, "forward_kl", "batchmean", False, id="fp32-V1000-T2-fwd-mean"),
    pytest.param(F32, 7, 1000, 1.0, 0.7, "reverse_kl", "sum", True, id="fp32-V1000-T1-rev-sum-feat"),
    pytest.param(F32, 7, 1000, 0.5, 0.7, "jsd", "none", True, id="fp32-V1000-T0.5-jsd-none-feat"),
    pytest.param(F32, 5, 1000, 2.0, 0.0, "forward_kl", "batchmean", False, id="fp32-alpha0"),
    pytest.param(F32, 5, 1000, 0.5, 1.0, "reverse_kl", "none", False, id="fp32-alpha1-rev-none"),
    pytest.param(F32, 1, 4097, 2.0, 1.0, "jsd", "batchmean", False, id="fp32-V4097-onerow-jsd"),
    pytest.param(BF16, 4, 4097, 1.0, 0.5, "forward_kl", "sum", False, id="bf16-V4097-T1-fwd-sum"),
    pytest.param(BF16, 7, 1000, 2.0, 0.5, "jsd", "batchmean", True, id="bf16-V1000-T2-jsd-feat"),
    pytest.param(F16, 7, 1000, 0.5, 0.5, "reverse_kl", "batchmean", False, id="fp16-V1000-T0.5-rev"),
    pytest.param(F32, 9, 333, 3.0, 0.5, "reverse_kl", "batchmean", False, id="fp32-V333-T3-rev"),
    pytest.param(BF16, 9, 333, 4.0, 0.5, "forward_kl", "none", False, id="bf16-V333-T4-fwd-none"),
    pytest.param(F32, 8, 2, 4.0, 0.7, "forward_kl", "batchmean", False, id="fp32-V2"),
]


@pytest.mark.parametrize("dtype,n,v,T,alpha,div,red,feats", CASES)
def test_matches_float64(dtype, n, v, T, alpha, div, red, feats):
    s, t, labels = make_inputs(n, v, dtype, ignored=(1, 5) if n > 5 else ((1,) if n > 2 else ()))
    fs, ft, fw = case_features(n, dtype, feats)
    check(forward, s, t, labels, fs=fs, ft=ft, temperature=T, alpha=alpha, divergence=div, reduction=red, **fw)


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_general_ce_path_at_integer_temperature(div):
    """t_pow=False: the CE's exps taken directly at T = 2 instead of as squares of the soft ones."""
    s, t, labels = make_inputs(5, 1000, ignored=(2,))
    check(forward, s, t, labels, launch=dict(t_pow=False), temperature=2.0, alpha=0.6, divergence=div)


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_neg_inf_entries(div):
    s, t, labels = with_neg_inf(*make_inputs(7, 1000, scale=4.0, ignored=(2,)), div)
    check(forward, s, t, labels, temperature=2.0, alpha=0.7, divergence=div)


def test_labels_at_row_edges():
    s, t, labels = make_inputs(5, 1000)
    labels[:] = torch.tensor([0, 999, 1, 998, 500])
    check(forward, s, t, labels, temperature=3.0, alpha=0.4, reduction="none")


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_all_ignored_batch_is_zero_with_zero_grads(reduction):
    s, t, labels = make_inputs(5, 600, ignored=range(5))
    loss, grad, _ = run(forward, s, t, labels, temperature=2.0, reduction=reduction)
    assert torch.equal(loss.cpu(), torch.zeros_like(loss.cpu()))
    assert torch.equal(grad.cpu(), torch.zeros_like(grad.cpu()))


@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
def test_ignored_rows_holding_nan_drop_out(div):
    """An ignored (padding) row holding NaN or -inf contributes nothing and gets a zero, finite gradient: its
    loads are masked off by the label that was prefetched for it."""
    s, t, labels = make_inputs(7, 600, ignored=(0, 3, 4))
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[3] = float("nan")
    s_bad[4] = float("nan")
    t_bad[0] = float("-inf")
    loss, grad, _ = run(forward, s_bad, t_bad, labels, temperature=2.0, alpha=0.6, divergence=div)
    keep = torch.tensor([1, 2, 5, 6])
    exp = reference.kd_loss(s[keep].double(), t[keep].double(), labels[keep], temperature=2.0, alpha=0.6,
                            divergence=div)
    assert loss.item() == pytest.approx(exp.item(), rel=1e-5)
    assert torch.isfinite(grad).all() and not grad[[0, 3, 4]].any()


def test_no_labels_and_mixed_teacher_dtype():
    s, _, _ = make_inputs(5, 700)
    _, t, _ = make_inputs(5, 700, BF16, seed=5)
    check(forward, s, t, None, temperature=2.0, alpha=0.7, divergence="reverse_kl")


def test_strided_inputs():
    s, t, labels = make_inputs(5, 2 * 300)
    s_view, t_view = s[:, ::2], t.t().contiguous().t()[:, :300]  # column stride 2; column-major
    check(forward, s_view, t_view, labels % 300, temperature=2.0, alpha=0.7)


@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
def test_no_grad_forward(div):
    s, t, labels = make_inputs(5, 1000, ignored=(1,))
    loss, grad, _ = run(forward, s, t, labels, want_grad=False, temperature=2.0, divergence=div, reduction="none")
    exp = reference.kd_loss(s.double(), t.double(), labels, temperature=2.0, divergence=div, reduction="none")
    assert grad is None
    assert_close_rel(loss, exp, LOSS_RTOL[F32], "loss")


def test_more_feature_rows_than_logit_rows():
    """Scalar reductions take M != N feature rows; the grid covers the larger of the two."""
    s, t, labels = make_inputs(2, 100)
    g = torch.Generator().manual_seed(4)
    fs, ft = torch.randn(7, 40, generator=g), torch.randn(7, 40, generator=g)
    check(forward, s, t, labels, fs=fs, ft=ft, temperature=2.0, feature_weight=2.0, reduction="sum")


def test_wider_rows_are_refused():
    s, t, labels = make_inputs(1, persistent.MAX_V + 1)
    with pytest.raises(ValueError, match="KDBENCH_KERNEL=split takes them"):
        run(forward, s, t, labels)


def test_alpha0_without_labels_is_zero():
    s, t, _ = make_inputs(3, 50)
    loss, grad, _ = run(forward, s, t, None, alpha=0.0)
    assert loss.item() == 0.0 and not grad.any()


def test_infinite_forward_kl_is_inf_not_nan():
    s, t, _ = make_inputs(2, 10)
    s[0, 3] = float("-inf")
    loss, _, _ = run(forward, s, t, None, alpha=1.0, reduction="none")
    assert loss[0].item() == math.inf and math.isfinite(loss[1].item())


def test_front_refuses_wide_rows(monkeypatch):
    import kdbench.kernels as kernels

    monkeypatch.setenv("KDBENCH_KERNEL", "persistent")
    s, t, labels = make_inputs(1, persistent.MAX_V + 1)
    with pytest.raises(kernels.KdLossInputError, match="KDBENCH_KERNEL=split takes them"):
        kernels.kd_loss(s, t, labels)


# ----------------------------------------------------------------------------------------------------------------
# sm_90 builds without a GPU, and 64-bit row offsets
# ----------------------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from kdbench.kernels import gpu_variants, kd_loss_persistent as persistent
base = dict(temperature=2.0, alpha=0.5, beta=0.5, ignore_index=-100, reduction="batchmean", feature_weight=0.0)
n = 0
for dtype, v, div, grad in ((torch.float32, 1000, "forward_kl", True), (torch.bfloat16, 1000, "reverse_kl", True),
                            (torch.float16, 4097, "jsd", True), (torch.float32, 2048, "forward_kl", False)):
    s = torch.empty((65536, v), dtype=dtype, device="meta")
    lab = torch.empty(65536, dtype=torch.int64, device="meta")
    _, args, meta = persistent.launch_args(s, s, lab, dict(base, divergence=div), grad)
    src, _ = gpu_variants.sm90_source(persistent._kd_loss_persistent_kernel, args, meta)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": persistent.num_warps_for(meta["BLOCK_V"])})
    assert k.asm["cubin"]
    # the program id is widened to 64 bits before it becomes a row and multiplies a row stride
    assert "tt.get_program_id x : i32" in k.asm["ttir"] and ": i32 to i64" in k.asm["ttir"], "no int64 rows"
    n += 1
print("compiled", n)
"""


def test_kernel_compiles_for_sm90():
    build_for_sm90(_COMPILE_SCRIPT, 4)
