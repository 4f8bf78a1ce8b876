"""kd_loss's input contract (issue 14, "The loss"), for CPU tensors on both backends (the reference, and Triton
under the interpreter): NaN or +inf in a valid teacher row, or a valid teacher row that is entirely -inf, is a
KdLossInputError naming the row, never a finite loss over NaN gradients; an ignored row may hold anything; inputs
that are not tensors are a KdLossInputError too (a KdbenchError: a run that hits it fails as bad input).
"""

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.kernels import KdLossInputError
from kdbench.kernels.front import front_with_backend

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: -inf - -inf


@pytest.fixture(params=["torch", "triton"])
def kd_loss(request):
    return front_with_backend(request.param)


def inputs(n=5, v=33, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g).requires_grad_()
    t = torch.randn(n, v, generator=g) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    return s, t, labels


@pytest.mark.parametrize("bad, name", [(float("nan"), "NaN"), (float("inf"), "+inf")])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_nan_or_plus_inf_in_a_teacher_row_is_refused(kd_loss, bad, name, reduction):
    s, t, labels = inputs()
    t[3, 7] = bad
    with pytest.raises(KdLossInputError) as info:
        kd_loss(s, t, labels, temperature=2.0, reduction=reduction)
    assert str(info.value) == f"kd_loss: teacher_logits row 3 holds {name}; only -inf (probability 0) may stand in " \
                              "for a logit"


def test_the_row_is_counted_in_the_flattened_logits(kd_loss):
    s, t, labels = inputs(n=6)
    s, t, labels = s.detach().reshape(2, 3, -1), t.reshape(2, 3, -1), labels.reshape(2, 3)
    t[1, 2, 0] = float("nan")
    with pytest.raises(KdLossInputError, match="teacher_logits row 5 holds NaN"):
        kd_loss(s, t, labels)


def test_a_teacher_row_that_is_all_minus_inf_is_refused(kd_loss):
    s, t, labels = inputs()
    t[2] = float("-inf")
    with pytest.raises(KdLossInputError, match="^kd_loss: teacher_logits row 2 is entirely -inf: it has no "
                                               "probability mass$"):
        kd_loss(s, t, labels, divergence="jsd", beta=0.3)
    with pytest.raises(KdLossInputError, match="row 2 is entirely -inf"):
        kd_loss(s, t, None, alpha=1.0)  # no labels: every row is valid


def test_an_ignored_row_may_hold_nan_and_all_minus_inf(kd_loss):
    """Padding rows are never read: the loss and the gradient are those of the other rows."""
    s, t, labels = inputs()
    t_bad = t.clone()
    t_bad[1, 4], t_bad[3] = float("nan"), float("-inf")
    ignored = labels.clone()
    ignored[[1, 3]] = -100
    loss = kd_loss(s, t_bad, ignored, temperature=2.0)
    loss.backward()
    keep = [0, 2, 4]
    s2 = s.detach()[keep].clone().requires_grad_()
    expected = kd_loss(s2, t[keep], labels[keep], temperature=2.0)
    expected.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.isfinite(s.grad).all() and not s.grad[[1, 3]].any()
    assert torch.allclose(s.grad[keep], s2.grad, rtol=1e-5, atol=1e-7)


def test_minus_inf_entries_stay_allowed(kd_loss):
    s, t, labels = inputs()
    t[:, ::4] = float("-inf")
    labels[labels % 4 == 0] = 1
    loss = kd_loss(s, t, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("args, kwargs, message", [
    (([[1.0, 2.0]], [[1.0, 2.0]]), {}, "kd_loss: student_logits and teacher_logits must be tensors"),
    ((torch.randn(2, 3), [[1.0, 2.0, 3.0]] * 2), {}, "kd_loss: student_logits and teacher_logits must be tensors"),
    ((torch.randn(2, 3), torch.randn(2, 3), [0, 1]), {},
     "kd_loss: labels shape list does not match the logits' leading dims (2,)"),
    ((torch.randn(2, 3), torch.randn(2, 3)), {"student_features": [[1.0]], "teacher_features": [[1.0]],
                                               "feature_weight": 1.0},
     "kd_loss: student_features and teacher_features must be tensors"),
])
def test_inputs_that_are_not_tensors(kd_loss, args, kwargs, message):
    with pytest.raises(KdLossInputError) as info:
        kd_loss(*args, **kwargs)
    assert str(info.value) == message
    assert isinstance(info.value, KdbenchError) and isinstance(info.value, ValueError)
