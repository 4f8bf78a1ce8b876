"""Non-finite teacher logits on the Triton path (issue 14; the contract is KD_LOSS_DOC, kernels/front.py).

NaN or +inf in a valid teacher row, or a valid teacher row that is entirely -inf, makes that row's loss NaN in
every kernel kd_loss can dispatch to, so that a mean over the rows is NaN and the trainer's NaN check stops the
run: never a finite loss over NaN gradients. On CPU tensors the front refuses such rows before any kernel runs
(tests/hardening/test_hardening_loss.py); these tests call the launchers directly, or switch that check off, to
see what a CUDA run gets (the front skips the check there: it would cost a host sync every step).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from kd_oracle import make_inputs
from kdbench.kernels import KdLossInputError, fused_linear_kd_loss, kd_loss, teacher_top_k, top_k_kd_loss
from kdbench.kernels import front

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: -inf - -inf

DEV = "cuda" if torch.cuda.is_available() else "cpu"
IGNORED_ROW, CLEAN_ROWS = 1, [0, 5]
BAD_ROWS = {"NaN": 2, "+inf": 3, "all -inf": 4}  # the teacher row spoiled each way


def spoil(t):
    """The teacher with rows 2, 3 and 4 made non-finite (a NaN, a +inf, all -inf); IGNORED_ROW holds NaN (it is
    padding, never read)."""
    t = t.clone()
    t[BAD_ROWS["NaN"], 7] = float("nan")
    t[BAD_ROWS["+inf"], 7] = float("inf")
    t[BAD_ROWS["all -inf"]] = float("-inf")
    t[IGNORED_ROW, 3] = float("nan")
    return t


def inputs(v=300):
    s, t, labels = make_inputs(6, v)
    labels[IGNORED_ROW] = -100
    return s.to(DEV), t.to(DEV), labels.to(DEV)


# (backend module, launch options, tiled): every kernel the front can dispatch 'triton' to, their paths, and the
# reference.
KERNELS = {
    "triton-whole-rows": ("kd_loss_triton", {}, False),
    "triton-tiled": ("kd_loss_triton", {}, True),
    "split-multi-launch": ("kd_loss_split", {"chunk": 128}, False),
    "split-single-launch": ("kd_loss_split", {"chunk": 512, "two_launch": False}, False),  # one chunk per row
    "persistent": ("kd_loss_persistent", {}, False),
    "torch-reference": ("reference", {}, False),  # the torch backend on CUDA (KDBENCH_KERNEL=torch) does the same
}


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_a_non_finite_teacher_row_gives_a_nan_row_loss(monkeypatch, kernel, div):
    """Each spoiled row's loss is NaN; the ignored row stays 0; the clean rows' losses and gradients are those of
    the clean inputs, to the bit."""
    name, launch, tiled = KERNELS[kernel]
    module = importlib.import_module(f"kdbench.kernels.{name}")
    if tiled:  # the online-softmax path at an interpreter-sized V
        monkeypatch.setattr(module, "MAX_FUSED_V", 64)
        monkeypatch.setattr(module, "INTERPRET_BLOCK_V", 128)
    s, t, labels = inputs()
    opts = dict(front.DEFAULTS, temperature=2.0, alpha=0.7, divergence=div)
    clean_rows, clean_grad, _, _ = module.kd_loss_forward(s, t, labels, opts, True, None, False, **launch)
    rows, grad, _, _ = module.kd_loss_forward(s, spoil(t), labels, opts, True, None, False, **launch)
    rows, grad, clean_rows, clean_grad = rows.cpu(), grad.cpu(), clean_rows.cpu(), clean_grad.cpu()
    for kind, row in BAD_ROWS.items():
        assert math.isnan(rows[row].item()), f"row {row}: loss {rows[row].item()} for a teacher row with {kind}"
    assert rows[IGNORED_ROW].item() == 0.0 and not grad[IGNORED_ROW].any()
    assert torch.equal(rows[CLEAN_ROWS], clean_rows[CLEAN_ROWS])
    assert torch.equal(grad[CLEAN_ROWS], clean_grad[CLEAN_ROWS])


def _no_host_check(monkeypatch):
    """The front as it runs on CUDA tensors: no check of the teacher's rows (it would cost a host sync)."""
    monkeypatch.setattr(front, "_check_teacher_rows", lambda *args: None)


@pytest.mark.parametrize("backend", ["triton", "split", "persistent"])
def test_through_the_front_the_rows_are_nan_and_so_is_the_mean(monkeypatch, backend):
    """reduction='none' keeps the NaN rows (none dropped); 'batchmean' and 'sum' are NaN."""
    monkeypatch.setenv("KDBENCH_KERNEL", backend)
    _no_host_check(monkeypatch)
    split = importlib.import_module("kdbench.kernels.kd_loss_split")
    monkeypatch.setitem(split.CHUNKS, "forward_kl", 512)  # an interpreter-sized chunk (the GPU's is 8192)
    s, t, labels = inputs()
    t = spoil(t)
    rows = kd_loss(s, t, labels, temperature=2.0, reduction="none").cpu()
    assert rows.isnan().tolist() == [i in BAD_ROWS.values() for i in range(6)]
    assert rows[IGNORED_ROW].item() == 0.0
    for reduction in ("batchmean", "sum"):
        assert math.isnan(kd_loss(s, t, labels, temperature=2.0, reduction=reduction).item()), reduction


def test_without_the_soft_term_the_teacher_is_not_read(monkeypatch):
    """alpha = 0: the loss is the cross-entropy alone, finite with finite gradients, whatever the teacher holds."""
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    _no_host_check(monkeypatch)
    s, t, labels = inputs()
    a = s.requires_grad_()
    loss = kd_loss(a, spoil(t), labels, alpha=0.0)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(a.grad).all()


def test_fused_linear_loss_is_nan(monkeypatch):
    """A NaN in one teacher hidden state: a NaN logit row inside one chunk, a NaN loss (refused on CPU)."""
    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(8, 6, generator=g), torch.randn(40, 6, generator=g)
    ht, wt = torch.randn(8, 5, generator=g), torch.randn(40, 5, generator=g)
    labels = torch.randint(0, 40, (8,), generator=g)
    ht[5, 0] = float("nan")
    args = [x.to(DEV) for x in (hs, ws, ht, wt, labels)]
    if DEV == "cpu":  # the rows count in the chunk's logits; the message says where the chunk starts
        with pytest.raises(KdLossInputError, match="^fused_linear_kd_loss: in the chunk of rows from 4: kd_loss: "
                                                   "teacher_logits row 1 holds NaN"):
            fused_linear_kd_loss(*args, temperature=2.0, chunk_rows=4)
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    _no_host_check(monkeypatch)
    assert math.isnan(fused_linear_kd_loss(*args, temperature=2.0, chunk_rows=4).item())


@pytest.mark.parametrize("tail", ["bucket", "uniform"])
def test_top_k_loss_rows_are_nan(monkeypatch, tail):
    """teacher_top_k of the spoiled teacher rows: NaN log-probabilities, so NaN row losses (refused on CPU)."""
    s, t, labels = inputs(100)
    lp, ids = teacher_top_k(spoil(t), 8, temperature=2.0)
    if DEV == "cpu":
        with pytest.raises(KdLossInputError, match="holds NaN"):
            top_k_kd_loss(s, lp, ids, labels, temperature=2.0, tail=tail)
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    _no_host_check(monkeypatch)
    rows = top_k_kd_loss(s, lp, ids, labels, temperature=2.0, tail=tail, reduction="none").cpu()
    assert rows.isnan().tolist() == [i in BAD_ROWS.values() for i in range(6)]
    assert math.isnan(top_k_kd_loss(s, lp, ids, labels, temperature=2.0, tail=tail).item())
