"""The split-row kd_loss kernel (kernels/kd_loss_split.py) against the float64 reference.

Under the interpreter it runs in its multi-launch mode (statistics, [jsd round,] gradient), with 256- or
1024-element chunks so that V = 1000 and 4097 span several chunks, one of them ragged. The single-launch mode with
waits runs here only for rows of one chunk (the interpreter runs programs one after another; a wait for another
program would never end); on CUDA every test runs the single launch.
"""

from __future__ import annotations

import math

import pytest
import torch

from kd_lean_cases import check, run, with_neg_inf
from kd_oracle import BF16, CUDA, F16, F32, LOSS_RTOL, assert_close_rel, case_features, make_inputs
from sm90_build import build_for_sm90
from kdbench.kernels import kd_loss_split as split
from kdbench.kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: -inf - -inf

forward = split.kd_loss_forward
C256, C1024 = {"chunk": 256}, {"chunk": 1024}

# (dtype, N, V, chunk, T, alpha, divergence, reduction, features): a spread over the axes, not their product.
CASES = [
    pytest.param(F32, 6, 1000, C256, 2.0, 0.5, "forward_kl", "batchmean", False, id="fp32-V1000-T2-fwd-mean"),
    pytest.param(F32, 6, 1000, C256, 1.0, 0.7, "reverse_kl", "sum", True, id="fp32-V1000-T1-rev-sum-feat"),
    pytest.param(F32, 6, 1000, C256, 0.5, 0.7, "jsd", "none", True, id="fp32-V1000-T0.5-jsd-none-feat"),
    pytest.param(F32, 4, 1000, C256, 2.0, 0.0, "forward_kl", "batchmean", False, id="fp32-alpha0"),
    pytest.param(F32, 4, 1000, C256, 0.5, 1.0, "reverse_kl", "none", False, id="fp32-alpha1-rev-none"),
    pytest.param(F32, 1, 4097, C1024, 2.0, 1.0, "jsd", "batchmean", False, id="fp32-V4097-onerow-jsd"),
    pytest.param(BF16, 4, 4097, C1024, 1.0, 0.5, "forward_kl", "sum", False, id="bf16-V4097-T1-fwd-sum"),
    pytest.param(BF16, 4, 1000, C256, 2.0, 0.5, "jsd", "batchmean", True, id="bf16-V1000-T2-jsd-feat"),
    pytest.param(F16, 4, 1000, C256, 0.5, 0.5, "reverse_kl", "batchmean", False, id="fp16-V1000-T0.5-rev"),
    pytest.param(F32, 5, 333, C256, 3.0, 0.5, "reverse_kl", "batchmean", False, id="fp32-V333-T3-rev"),
    pytest.param(BF16, 5, 333, C256, 4.0, 0.5, "forward_kl", "none", False, id="bf16-V333-T4-fwd-none"),
]


@pytest.mark.parametrize("dtype,n,v,launch,T,alpha,div,red,feats", CASES)
def test_matches_float64(dtype, n, v, launch, T, alpha, div, red, feats):
    s, t, labels = make_inputs(n, v, dtype, ignored=(1,) if n > 2 else ())
    fs, ft, fw = case_features(n, dtype, feats)
    check(forward, s, t, labels, fs=fs, ft=ft, launch=launch, temperature=T, alpha=alpha, divergence=div,
          reduction=red, **fw)


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_general_ce_path_at_integer_temperature(div):
    """t_pow=False: the CE's exps taken directly at T = 2 instead of as squares of the soft ones."""
    s, t, labels = make_inputs(4, 1000, ignored=(2,))
    check(forward, s, t, labels, launch=dict(chunk=256, t_pow=False), temperature=2.0, alpha=0.6, divergence=div)


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_neg_inf_entries(div):
    """-inf logits, also whole chunks of them (row 0 from a third of the way on)."""
    s, t, labels = with_neg_inf(*make_inputs(5, 1000, scale=4.0, ignored=(2,)), div)
    check(forward, s, t, labels, launch=C256, temperature=2.0, alpha=0.7, divergence=div)


def test_labels_at_chunk_edges():
    """The one-hot term is one scalar store per row by the chunk holding the label: labels on the first and last
    column of a chunk, of the row, and in the ragged last chunk."""
    s, t, labels = make_inputs(6, 1000)
    labels[:] = torch.tensor([0, 255, 256, 767, 768, 999])
    check(forward, s, t, labels, launch=C256, temperature=3.0, alpha=0.4, reduction="none")


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_all_ignored_batch_is_zero_with_zero_grads(reduction):
    s, t, labels = make_inputs(3, 600, ignored=range(3))
    loss, grad, _ = run(forward, s, t, labels, launch=C256, temperature=2.0, reduction=reduction)
    assert torch.equal(loss.cpu(), torch.zeros_like(loss.cpu()))
    assert torch.equal(grad.cpu(), torch.zeros_like(grad.cpu()))


@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
def test_ignored_rows_holding_nan_drop_out(div):
    """An ignored (padding) row holding NaN or -inf contributes nothing and gets a zero, finite gradient."""
    s, t, labels = make_inputs(5, 600, ignored=(0, 3))
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[3] = float("nan")
    t_bad[0] = float("-inf")
    loss, grad, _ = run(forward, s_bad, t_bad, labels, launch=C256, temperature=2.0, alpha=0.6, divergence=div)
    keep = torch.tensor([1, 2, 4])
    exp = reference.kd_loss(s[keep].double(), t[keep].double(), labels[keep], temperature=2.0, alpha=0.6,
                            divergence=div)
    assert loss.item() == pytest.approx(exp.item(), rel=1e-5)
    assert torch.isfinite(grad).all() and not grad[[0, 3]].any()


def test_no_labels_and_mixed_teacher_dtype():
    s, _, _ = make_inputs(4, 700)
    _, t, _ = make_inputs(4, 700, BF16, seed=5)
    check(forward, s, t, None, launch=C256, temperature=2.0, alpha=0.7, divergence="reverse_kl")


def test_strided_inputs():
    s, t, labels = make_inputs(4, 2 * 300)
    s_view, t_view = s[:, ::2], t.t().contiguous().t()[:, :300]  # column stride 2; column-major
    check(forward, s_view, t_view, labels % 300, launch=C256, temperature=2.0, alpha=0.7)


@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
def test_no_grad_forward(div):
    """Without a gradient only chunk 0 of each row reads the merged statistics (jsd: every chunk's share of the
    second round still)."""
    s, t, labels = make_inputs(4, 1000, ignored=(1,))
    loss, grad, _ = run(forward, s, t, labels, want_grad=False, launch=C256, temperature=2.0, divergence=div,
                        reduction="none")
    exp = reference.kd_loss(s.double(), t.double(), labels, temperature=2.0, divergence=div, reduction="none")
    assert grad is None
    assert_close_rel(loss, exp, LOSS_RTOL[F32], "loss")


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_single_launch_with_waits(div):
    """The single launch (PHASE 0): publish, count, wait, merge, gradient, on rows of one chunk, where every wait
    is for the program itself (so it runs under the interpreter too)."""
    s, t, labels = make_inputs(4, 200, ignored=(2,))
    check(forward, s, t, labels, launch=dict(chunk=256, two_launch=False), temperature=2.0, alpha=0.6,
          divergence=div)


def test_single_launch_refused_where_the_row_cannot_be_resident():
    """Under the interpreter no program runs beside another: a row of several chunks cannot take the single
    launch, and asking for it is refused instead of hanging."""
    if CUDA:
        pytest.skip("on CUDA the programs are resident together")
    s, t, labels = make_inputs(2, 600)
    with pytest.raises(ValueError, match="programs fit at once"):
        run(forward, s, t, labels, launch=dict(chunk=256, two_launch=False))


def test_alpha0_without_labels_is_zero():
    s, t, _ = make_inputs(2, 300)
    loss, grad, _ = run(forward, s, t, None, launch=C256, alpha=0.0)
    assert loss.item() == 0.0 and not grad.any()


def test_infinite_forward_kl_is_inf_not_nan():
    s, t, _ = make_inputs(2, 300)
    s[0, 3] = float("-inf")
    loss, _, _ = run(forward, s, t, None, launch=C256, alpha=1.0, reduction="none")
    assert loss[0].item() == math.inf and math.isfinite(loss[1].item())


# ----------------------------------------------------------------------------------------------------------------
# Selection through the front (kernels/front.py): opt-in only (the launch through it: test_kd_loss_front.py)
# ----------------------------------------------------------------------------------------------------------------


def test_variant_resolution(monkeypatch):
    """What 'triton' means under KDBENCH_KERNEL_VARIANT; the committed kernel unless asked."""
    from kdbench.kernels import front
    from kdbench.kernels import kd_loss_persistent as persistent

    small, wide = torch.zeros(2, 8192), torch.zeros(2, 8193)
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    monkeypatch.delenv("KDBENCH_KERNEL_VARIANT", raising=False)
    assert front.backend_for(small) == front.backend_for(wide) == "triton"
    expected = {"auto": ("triton", "triton"), "split": ("split", "split"), "persistent": ("persistent", "triton"),
                "new": ("persistent", "split")}
    for variant, (for_small, for_wide) in expected.items():
        monkeypatch.setenv("KDBENCH_KERNEL_VARIANT", variant)
        assert (front.backend_for(small), front.backend_for(wide)) == (for_small, for_wide), variant
    monkeypatch.setenv("KDBENCH_KERNEL", "torch")
    assert front.backend_for(small) == "torch"  # the variant refines only the Triton choice
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    monkeypatch.setenv("KDBENCH_KERNEL_VARIANT", "fast")
    with pytest.raises(front.KdLossInputError, match="KDBENCH_KERNEL_VARIANT='fast' is not one of"):
        front.backend_for(small)
    assert front._PERSISTENT_MAX_V == persistent.MAX_V


# ----------------------------------------------------------------------------------------------------------------
# sm_90 builds without a GPU: every PHASE compiles, and row offsets are 64-bit
# ----------------------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from kdbench.kernels import gpu_variants, kd_loss_split as split
base = dict(temperature=2.0, alpha=0.5, beta=0.5, ignore_index=-100, reduction="batchmean", feature_weight=0.0)
n = 0
builds = ((torch.bfloat16, "forward_kl", (0, 1, 3), True), (torch.float32, "reverse_kl", (0,), True),
          (torch.bfloat16, "jsd", (0, 1, 2, 3), True), (torch.float16, "forward_kl", (0,), False))
for dtype, div, phases, grad in builds:
    s = torch.empty((8192, 128256), dtype=dtype, device="meta")
    lab = torch.empty(8192, dtype=torch.int64, device="meta")
    _, args, meta = split.launch_args(s, s, lab, dict(base, divergence=div), grad)
    for phase in phases:
        src, _ = gpu_variants.sm90_source(split._kd_loss_split_kernel, args, dict(meta, PHASE=phase))
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": split.NUM_WARPS})
        assert k.asm["cubin"]
        ttir = k.asm["ttir"]
        # row = ticket // C is widened to 64 bits before it multiplies a row stride
        assert "arith.extsi" in ttir and ": i32 to i64" in ttir and "arith.muli" in ttir, "no int64 row offsets"
        n += 1
print("compiled", n)
"""


def test_kernel_compiles_for_sm90():
    build_for_sm90(_COMPILE_SCRIPT, 9)
