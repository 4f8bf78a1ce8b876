"""`feature_loss: cosine` (hidden, progressive) and `attention_loss: kl` (attention) against their formulas written
from their definitions (DistilBERT's cosine, MiniLM's attention KL), in float64, with padding."""

import math
from types import SimpleNamespace

import pytest
import torch

from kdbench.kernels import kd_loss
from kdbench.methods import make_objective
from kdbench.methods.attention import AttentionKD, AttentionParams
from kdbench.methods.hidden import HiddenParams, HiddenStateKD
from kdbench.methods.progressive import ProgressiveKD, ProgressiveParams
from bert_pair import student_model, teacher_model

MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
REAL = [(b, q) for b in range(2) for q in range(5) if MASK[b, q]]


def outputs64(seed: int, widths, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(logits=torch.randn(2, classes, generator=g, dtype=torch.float64),
                           hidden_states=tuple(torch.randn(2, 5, w, generator=g, dtype=torch.float64)
                                               for w in widths))


def cosine_by_hand(objective, s, t, pairs) -> float:
    """mean over mapped pairs and real tokens of 1 - <W h_s + b, h_t> / (|W h_s + b| |h_t|), one token at a time."""
    terms = []
    for si, ti in pairs:
        lin = objective.modules[str(si)]
        for b, q in REAL:
            x = lin.weight @ s.hidden_states[si][b, q] + lin.bias
            y = t.hidden_states[ti][b, q]
            terms.append(1.0 - float(x @ y) / (math.sqrt(float(x @ x)) * math.sqrt(float(y @ y))))
    return sum(terms) / len(terms)


def test_hidden_cosine_is_logit_kd_plus_the_weighted_mean_of_1_minus_cos_over_real_tokens():
    objective = HiddenStateKD(HiddenParams(temperature=2.0, alpha=0.6, feature_weight=0.5, feature_loss="cosine"))
    objective.setup(student_model(), teacher_model())  # map {0: 0, 1: 2}, projections 16 -> 32
    objective.modules.double()
    s, t = outputs64(0, (16, 16)), outputs64(1, (32, 32, 32))
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        loss = objective.loss(s, t, labels, attention_mask=MASK)
        logit = kd_loss(s.logits, t.logits, labels, temperature=2.0, alpha=0.6)
        expected = logit.item() + 0.5 * cosine_by_hand(objective, s, t, [(0, 0), (1, 2)])
        assert loss.item() == pytest.approx(expected, rel=1e-10)
        # padding takes no part, even NaN there; a real token does
        s.hidden_states[1][1, 3] = float("nan")
        t.hidden_states[2][1, 4] = 1e6
        assert objective.loss(s, t, labels, attention_mask=MASK).item() == loss.item()
        t.hidden_states[2][1, 2] *= -1
        assert objective.loss(s, t, labels, attention_mask=MASK).item() != loss.item()
    # and it differs from the MSE default, which stays what it was
    mse = HiddenStateKD(HiddenParams(temperature=2.0, alpha=0.6, feature_weight=0.5))
    assert mse.params.feature_loss == "mse"


def test_hidden_cosine_of_a_scaled_copy_is_zero_and_its_gradient_reaches_the_projections():
    objective = HiddenStateKD(HiddenParams(feature_weight=1.0, feature_loss="cosine", layer_map={1: 1}))
    objective.setup(student_model(), student_model())
    objective.modules.double()
    s = outputs64(0, (16, 16))
    lin = objective.modules["1"]
    with torch.no_grad():
        projected = s.hidden_states[1] @ lin.weight.T + lin.bias
    t = SimpleNamespace(logits=s.logits.clone(), hidden_states=(s.hidden_states[0], 3.0 * projected))
    with torch.no_grad():
        feature = objective.loss(s, t, None, attention_mask=MASK) - make_objective("logit", {"alpha": 1.0}).loss(
            s, t, None)
    assert abs(feature.item()) < 1e-12  # cos = 1: the scale of the teacher's states does not count
    t.hidden_states = (s.hidden_states[0], torch.randn(2, 5, 16, dtype=torch.float64))
    objective.loss(s, t, None, attention_mask=MASK).backward()
    assert lin.weight.grad.abs().sum() > 0


def test_progressive_cosine_stage_is_the_weighted_mean_of_1_minus_cos_of_its_pair():
    from bert_pair import bert

    objective = ProgressiveKD(ProgressiveParams(feature_weight=0.5, feature_loss="cosine"))
    objective.setup(bert(2, 16, 2, 0), teacher_model())  # map {1: 1, 2: 2}
    objective.modules.double()
    s, t = outputs64(0, (16, 16, 16)), outputs64(1, (32, 32, 32))
    with torch.no_grad():
        for stage, pair in [(1, (1, 1)), (2, (2, 2))]:
            objective.stage = stage
            loss = objective.loss(s, t, torch.tensor([2, 0]), attention_mask=MASK)
            assert loss.item() == pytest.approx(0.5 * cosine_by_hand(objective, s, t, [pair]), rel=1e-10)


def attention64(seed: int, layers: int, heads: int, mask, causal=False):
    """Softmax maps (B, heads, L, L) that give padding keys probability 0, as a model's masked softmax does."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        scores = torch.randn(2, heads, 5, 5, generator=g, dtype=torch.float64)
        keep = mask.bool()[:, None, None, :].expand(scores.shape)
        if causal:
            keep = keep & torch.ones(5, 5, dtype=torch.bool).tril()
        out.append(torch.softmax(scores.masked_fill(~keep, float("-inf")), -1))
    return tuple(out)


def kl_by_hand(s_attn, t_attn, pairs, mask) -> float:
    """MiniLM's KL(teacher || student) of the head-averaged rows: mean over pairs and real queries of
    sum over real keys of t (log t - log s), one query at a time."""
    terms = []
    for si, ti in pairs:
        for b, q in REAL:
            total = 0.0
            for k in range(5):
                if not mask[b, k]:
                    continue
                ps = float(s_attn[si - 1][b, :, q, k].mean())
                pt = float(t_attn[ti - 1][b, :, q, k].mean())
                total += pt * (math.log(pt) - math.log(ps)) if pt > 0 else 0.0
            terms.append(total)
    return sum(terms) / len(terms)


def test_attention_kl_is_logit_kd_plus_the_weighted_mean_kl_of_real_query_rows():
    objective = AttentionKD(AttentionParams(temperature=2.0, alpha=0.6, feature_weight=3.0, attention_loss="kl"))
    objective.setup(student_model(), teacher_model())  # map {1: 2}
    s_attn, t_attn = attention64(0, 1, 2, MASK), attention64(1, 2, 4, MASK)
    s = SimpleNamespace(logits=outputs64(0, ()).logits, attentions=s_attn)
    t = SimpleNamespace(logits=outputs64(1, ()).logits, attentions=t_attn)
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        loss = objective.loss(s, t, labels, attention_mask=MASK)
        logit = kd_loss(s.logits, t.logits, labels, temperature=2.0, alpha=0.6)
        expected = logit.item() + 3.0 * kl_by_hand(s_attn, t_attn, [(1, 2)], MASK)
        assert loss.item() == pytest.approx(expected, rel=1e-10)
        assert loss.item() > logit.item()
        # a padding query row, and a padding key column, take no part
        s_attn[0][1, :, 4, :] = float("nan")
        s_attn[0][1, :, 0, 3] = 0.7
        assert objective.loss(s, t, labels, attention_mask=MASK).item() == loss.item()
        # identical maps: no attention term
        same = SimpleNamespace(logits=s.logits, attentions=(t_attn[1][:, :2],))
        twin = SimpleNamespace(logits=t.logits, attentions=(t_attn[0], t_attn[1][:, :2]))
        assert objective.loss(same, twin, labels, attention_mask=MASK).item() == pytest.approx(logit.item(),
                                                                                               rel=1e-12)
    assert AttentionParams().attention_loss == "mse"


def test_attention_kl_on_a_causal_decoder_counts_keys_up_to_the_query():
    from kdbench.methods.feature_losses import attention_kl_loss, attention_rows

    s_attn, t_attn = attention64(2, 1, 2, MASK, causal=True), attention64(3, 1, 3, MASK, causal=True)
    rows = attention_rows(s_attn, t_attn, {1: 1}, MASK, causal=True)
    got = attention_kl_loss([rows]).item()
    # by hand: keys k <= q that are real; the maps are 0 elsewhere in both, as a causal decoder's are
    terms = []
    for b, q in REAL:
        total = 0.0
        for k in range(q + 1):
            if MASK[b, k]:
                ps, pt = float(s_attn[0][b, :, q, k].mean()), float(t_attn[0][b, :, q, k].mean())
                total += pt * (math.log(pt) - math.log(ps))
        terms.append(total)
    assert got == pytest.approx(sum(terms) / len(terms), rel=1e-10)
    assert rows[2].sum().item() == sum(q + 1 if b == 0 else min(q + 1, 3) for b, q in REAL)


def test_unknown_loss_names_are_refused_by_the_method_schema():
    from kdbench.errors import KdbenchError

    with pytest.raises(KdbenchError, match="feature_loss"):
        make_objective("hidden", {"feature_loss": "l1"})
    with pytest.raises(KdbenchError, match="attention_loss"):
        make_objective("attention", {"attention_loss": "cosine"})
    with pytest.raises(KdbenchError, match="feature_loss"):
        make_objective("progressive", {"feature_loss": "kl"})
