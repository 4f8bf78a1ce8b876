"""top_k_kd_loss and teacher_top_k: the loss against a teacher cached as its k most likely tokens per row.

The oracle is written here from the definition, in float64 with autograd and without kd_loss: both distributions
coarsened to {each of the teacher's top-k tokens, the rest} by summing probabilities, then the divergence between
the two (k + 1)-bucket distributions, plus the cross-entropy on the whole student row.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.kernels import KdLossInputError, kd_loss, teacher_samples, teacher_top_k, top_k_kd_loss

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: -inf - -inf


def make(n=10, v=23, *, dtype=torch.float64, seed=0, ignore=(2, 7)):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_(True)
    t = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[list(i for i in ignore if i < n)] = -100
    return s, t, labels


def oracle(s, t, labels, k, *, temperature, alpha, divergence="forward_kl", beta=0.5, reduction="batchmean"):
    s, t = s.double(), t.double()
    ids = t.topk(min(k, t.shape[-1]), dim=-1).indices
    p, q = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)

    def buckets(x):
        kept = x.gather(-1, ids)
        return torch.cat([kept, 1 - kept.sum(-1, keepdim=True)], -1) if ids.shape[-1] < x.shape[-1] else kept

    pb, qb = buckets(p), buckets(q)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if divergence == "forward_kl":
        d = kl(pb, qb)
    elif divergence == "reverse_kl":
        d = kl(qb, pb)
    else:
        m = beta * pb + (1 - beta) * qb
        d = beta * kl(pb, m) + (1 - beta) * kl(qb, m)
    valid = labels != -100
    ce = F.cross_entropy(s, labels, ignore_index=-100, reduction="none")
    rows = torch.where(valid, alpha * temperature**2 * d + (1 - alpha) * ce, 0.0)
    return {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / valid.sum().clamp(min=1)}[reduction]


def cached(t, k, temperature):
    return teacher_top_k(t, k, temperature=temperature)


def assert_close(a, b, rtol):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all()
    scale = max(float(b.abs().max()), 1e-30)
    assert float((a - b).abs().max()) / scale <= rtol, (a, b)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [1, 5, 22])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_matches_the_bucket_divergence_from_its_definition(divergence, k, reduction):
    s, t, labels = make()
    kw = dict(temperature=2.0, alpha=0.7, divergence=divergence, beta=0.3, reduction=reduction)
    got = top_k_kd_loss(s, *cached(t, k, 2.0), labels, **kw)
    want = oracle(s, t, labels, k, **kw)
    assert_close(got, want, 1e-10)
    weights = torch.linspace(0.5, 1.5, got.numel(), dtype=got.dtype).reshape(got.shape)
    (g,) = torch.autograd.grad((got * weights).sum(), s)
    (w,) = torch.autograd.grad((want * weights).sum(), s)
    assert_close(g, w, 1e-9)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [1, 5, 23])
def test_a_uniform_tail_is_kd_loss_against_the_tail_mass_spread_evenly(divergence, k):
    s, t, labels = make()
    kw = dict(temperature=2.0, alpha=0.7, divergence=divergence, beta=0.3)
    got = top_k_kd_loss(s, *cached(t, k, 2.0), labels, tail="uniform", **kw)
    # the teacher as the loss should see it, built from the definition: kept tokens' probabilities at T, the
    # rest's total shared by the other tokens
    p = F.softmax(t.double() / 2.0, -1)
    ids = t.topk(k, dim=-1).indices
    kept = torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids, True)
    rest = (p * ~kept).sum(-1, keepdim=True) / max(1, 23 - k)
    spread = torch.where(kept, p, rest)
    want = kd_loss(s, spread.log() * 2.0, labels, **kw)
    assert_close(got, want, 1e-10)
    assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], 1e-9)
    if divergence == "forward_kl" and k < 23:  # bucket + p_tail * KL(uniform || the student's tail): never less
        bucket = top_k_kd_loss(s, *cached(t, k, 2.0), labels, **kw)
        assert float(got.detach()) > float(bucket.detach())


@pytest.mark.parametrize("k", [23, 40])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_every_token_kept_is_kd_loss_on_the_whole_logits(k, divergence):
    s, t, labels = make()
    kw = dict(temperature=3.0, alpha=0.6, divergence=divergence)
    lp, ids = cached(t, k, 3.0)
    assert ids.shape[-1] == 23 and math.isinf(float(lp[0, -1]))  # k cut to V; no tail
    got = top_k_kd_loss(s, lp, ids, labels, **kw)
    want = kd_loss(s, t, labels, **kw)
    assert_close(got, want, 1e-10)
    assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], 1e-9)


@pytest.mark.parametrize("tail", ["bucket", "uniform"])
def test_chunks_of_rows_give_the_whole_loss_and_gradient(monkeypatch, tail):
    from kdbench.kernels import top_k as module

    s, t, labels = make(n=10)
    kw = dict(temperature=2.0, alpha=0.7, divergence="jsd", tail=tail)
    whole = top_k_kd_loss(s, *cached(t, 4, 2.0), labels, **kw)
    (want,) = torch.autograd.grad(whole * 3.5, s)
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 23 * 3)  # chunks of 3, 3, 3 and 1 rows
    chunked = top_k_kd_loss(s, *cached(t, 4, 2.0), labels, **kw)
    assert_close(chunked, whole, 1e-12)
    assert_close(torch.autograd.grad(chunked * 3.5, s)[0], want, 1e-12)


def test_without_grad_no_gradient_is_computed(monkeypatch):
    s, t, labels = make()
    want = top_k_kd_loss(s, *cached(t, 4, 2.0), labels, temperature=2.0).detach()

    def refuse(*args, **kwargs):
        raise AssertionError("a gradient was computed under no_grad")

    monkeypatch.setattr(torch.autograd, "grad", refuse)
    with torch.no_grad():
        got = top_k_kd_loss(s, *cached(t, 4, 2.0), labels, temperature=2.0)
    assert_close(got, want, 1e-12)


def test_teacher_top_k_keeps_the_largest_tokens_and_the_true_probabilities():
    _, t, _ = make(n=6, v=50, dtype=torch.float32)
    lp, ids = teacher_top_k(t, 7, temperature=4.0)
    assert lp.shape == (6, 8) and ids.shape == (6, 7) and ids.dtype == torch.int32 and lp.dtype == torch.float32
    assert torch.equal(ids.long(), t.topk(7, dim=-1).indices)
    p = F.softmax(t.double() / 4.0, -1)
    assert_close(lp[:, :7].exp(), p.gather(-1, ids.long()), 1e-6)  # not renormalised over the kept tokens
    assert_close(lp.exp().sum(-1), torch.ones(6, dtype=torch.float64), 1e-6)


def test_a_tiny_tail_is_summed_not_cancelled():
    # the kept token holds all but ~e^-60 of the mass: 1 - kept is 0 in fp32, the tail's own logsumexp is not
    t = torch.zeros(3, 9, dtype=torch.float64)
    t[:, 4] = 60.0
    lp, _ = teacher_top_k(t.float(), 1)
    want = torch.logsumexp(torch.cat([t[:, :4], t[:, 5:]], -1), -1) - torch.logsumexp(t, -1)
    assert_close(lp[:, 1], want, 1e-6)


def test_without_labels_the_cross_entropy_is_absent():
    s, t, _ = make(ignore=())
    got = top_k_kd_loss(s, *cached(t, 4, 2.0), None, temperature=2.0, alpha=0.5)
    everyone = torch.zeros(10, dtype=torch.long)
    want = oracle(s, t, everyone, 4, temperature=2.0, alpha=0.5, reduction="none")
    ce = F.cross_entropy(s.double(), everyone, reduction="none")
    assert_close(got, (want - 0.5 * ce).mean(), 1e-10)


def test_batched_rows_and_all_rows_ignored():
    s, t, labels = make(n=12)
    lp, ids = cached(t, 3, 1.5)
    kw = dict(temperature=1.5, alpha=0.8)
    flat = top_k_kd_loss(s, lp, ids, labels, **kw)
    batched = top_k_kd_loss(s.view(3, 4, 23), lp.view(3, 4, 4), ids.view(3, 4, 3), labels.view(3, 4), **kw)
    assert_close(batched, flat, 1e-12)
    none = top_k_kd_loss(s, lp, ids, torch.full_like(labels, -100), **kw)
    assert float(none.detach()) == 0.0 and not torch.autograd.grad(none, s)[0].any()


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_low_precision_students_against_float64(dtype, rtol):
    s, t, labels = make(n=16, v=1000, dtype=dtype)
    kw = dict(temperature=2.0, alpha=0.7)
    got = top_k_kd_loss(s, *cached(t, 16, 2.0), labels, **kw)
    assert got.dtype == torch.float32
    assert_close(got, oracle(s.detach().double().requires_grad_(), t, labels, 16, **kw), rtol)


def test_runs_the_triton_kernel_on_the_buckets(monkeypatch):
    import importlib

    module = importlib.import_module("kdbench.kernels.kd_loss_triton")
    seen = []
    launch = module.kd_loss_forward

    def spy(student, *args, **kwargs):
        seen.append(tuple(student.shape))
        return launch(student, *args, **kwargs)

    monkeypatch.setattr(module, "kd_loss_forward", spy)
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    s, t, labels = make(n=8, v=40, dtype=torch.float32)
    kw = dict(temperature=2.0, alpha=0.7, divergence="jsd")
    got = top_k_kd_loss(s, *cached(t, 6, 2.0), labels, **kw)
    assert seen == [(8, 7)]
    assert_close(got, oracle(s.detach().double().requires_grad_(), t, labels, 6, **kw), 1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "lp": a["lp"][:, :-1]}, r"k \+ 1 = 5 columns"),
    (lambda a: {**a, "ids": a["ids"].float()}, "must be integers"),
    (lambda a: {**a, "ids": a["ids"] + 30}, "outside the student's vocabulary of 23"),
    (lambda a: {**a, "lp": a["lp"][:4]}, "must share their leading dims"),
    (lambda a: {**a, "labels": a["labels"][:4]}, "labels shape"),
    (lambda a: {**a, "tail": "renormalised"}, "tail must be one of"),
])
def test_bad_arguments_get_one_line_errors(change, message):
    s, t, labels = make()
    lp, ids = cached(t, 4, 1.0)
    a = change({"lp": lp, "ids": ids, "labels": labels})
    with pytest.raises(KdLossInputError, match=message) as err:
        top_k_kd_loss(s, a["lp"], a["ids"], a["labels"], tail=a.get("tail", "bucket"))
    assert "\n" not in str(err.value)


def test_teacher_samples_keep_each_drawn_tokens_share_of_the_draws():
    _, t, _ = make(n=5, v=30, dtype=torch.float32)
    lp, ids = teacher_samples(t, 12, temperature=2.0, generator=torch.Generator().manual_seed(3))
    again = teacher_samples(t, 12, temperature=2.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(lp, again[0]) and torch.equal(ids, again[1])  # the generator decides the draws
    assert lp.shape == (5, 13) and ids.shape == (5, 12) and ids.dtype == torch.int32
    shares = lp.exp()
    assert torch.allclose(shares.sum(-1), torch.ones(5)) and math.isinf(float(lp[:, -1].max()))  # no tail
    assert torch.allclose(shares * 12, (shares * 12).round(), atol=1e-5)  # counts of 12 draws
    assert all(len(set(row.tolist())) == 12 for row in ids)  # distinct tokens: a partition of the vocabulary


def test_sampled_teacher_gradient_is_unbiased_where_top_k_is_biased():
    """Random-sampling KD: over many draws of 4 tokens, the mean gradient of the forward-KL bucket loss is the full
    kd_loss gradient (within 5 standard errors); the top-4 teacher's gradient is off by far more."""
    s, t, _ = make(n=3, v=9, ignore=())
    kw = dict(temperature=2.0, alpha=1.0, reduction="sum")
    (want,) = torch.autograd.grad(kd_loss(s, t, **kw), s)
    copies = 4000
    rows = s.detach().repeat(copies, 1).requires_grad_()
    cache = teacher_samples(t.repeat(copies, 1), 4, temperature=2.0, generator=torch.Generator().manual_seed(0))
    (grads,) = torch.autograd.grad(top_k_kd_loss(rows, *cache, **kw), rows)
    grads = grads.view(copies, 3, 9)
    error = 5 * grads.std(0) / copies**0.5 + 1e-12
    assert ((grads.mean(0) - want).abs() <= error).all()
    (top,) = torch.autograd.grad(top_k_kd_loss(s, *teacher_top_k(t, 4, temperature=2.0), **kw), s)
    assert ((top - want).abs() > 10 * error).any()


@pytest.mark.parametrize("k", [0, 2.5, True])
def test_teacher_top_k_and_samples_refuse_a_bad_size(k):
    with pytest.raises(KdLossInputError, match="teacher_top_k: k must be a positive integer"):
        teacher_top_k(torch.randn(2, 5), k)
    with pytest.raises(KdLossInputError, match="teacher_samples: n must be a positive integer"):
        teacher_samples(torch.randn(2, 5), k)
