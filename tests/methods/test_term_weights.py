"""`weights: {ce, soft, hidden, attention}`: each loss term with its own weight, against the terms written from their
definitions in float64 (soft targets: Hinton et al.'s T^2 * KL; CE; DistilBERT's cosine; the features' MSE), and
the refusals of weights a method cannot take."""

import math
from types import SimpleNamespace

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.methods import make_objective
from kdbench.methods.attention import AttentionKD, AttentionParams
from kdbench.methods.hidden import HiddenParams, HiddenStateKD
from bert_pair import student_model, teacher_model

MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
LABELS = torch.tensor([2, 0])
T = 2.0


def outputs64(seed: int, widths):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(logits=torch.randn(2, 3, generator=g, dtype=torch.float64),
                           hidden_states=tuple(torch.randn(2, 5, w, generator=g, dtype=torch.float64)
                                               for w in widths))


def soft_by_hand(s, t) -> float:
    """T^2 * mean over rows of KL(softmax(t/T) || softmax(s/T))."""
    total = 0.0
    for row in range(s.shape[0]):
        ps, pt = torch.softmax(s[row] / T, -1), torch.softmax(t[row] / T, -1)
        total += sum(float(pt[k]) * (math.log(float(pt[k])) - math.log(float(ps[k]))) for k in range(s.shape[1]))
    return T * T * total / s.shape[0]


def ce_by_hand(s, labels) -> float:
    return -sum(float(torch.log_softmax(s[r], -1)[labels[r]]) for r in range(s.shape[0])) / s.shape[0]


def projected(objective, s, t, pairs):
    fs, ft = [], []
    for si, ti in pairs:
        lin = objective.modules[str(si)]
        keep = MASK.bool()
        fs.append(s.hidden_states[si][keep] @ lin.weight.T + lin.bias)
        ft.append(t.hidden_states[ti][keep])
    return torch.cat(fs), torch.cat(ft)


def test_logit_weights_weigh_soft_targets_and_ce_apart():
    s, t = outputs64(0, ()), outputs64(1, ())
    objective = make_objective("logit", {"temperature": T, "weights": {"soft": 5.0, "ce": 2.0}})
    with torch.no_grad():
        loss = objective.loss(s, t, LABELS).item()
    assert loss == pytest.approx(5.0 * soft_by_hand(s.logits, t.logits) + 2.0 * ce_by_hand(s.logits, LABELS),
                                 rel=1e-10)
    only_soft = make_objective("logit", {"temperature": T, "weights": {"soft": 1.0}})
    with torch.no_grad():
        assert only_soft.loss(s, t, LABELS).item() == pytest.approx(soft_by_hand(s.logits, t.logits), rel=1e-10)


@pytest.mark.parametrize("feature_loss", ["mse", "cosine"])
def test_distilberts_triple_loss_is_soft_plus_ce_plus_the_hidden_term(feature_loss):
    objective = HiddenStateKD(HiddenParams(temperature=T, feature_loss=feature_loss, layer_map={1: 2},
                                           weights={"soft": 5.0, "ce": 2.0, "hidden": 1.5}))
    objective.setup(student_model(), teacher_model())
    objective.modules.double()
    s, t = outputs64(0, (16, 16)), outputs64(1, (32, 32, 32))
    with torch.no_grad():
        loss = objective.loss(s, t, LABELS, attention_mask=MASK).item()
        fs, ft = projected(objective, s, t, [(1, 2)])
        if feature_loss == "mse":
            hidden = float(((fs - ft) ** 2).mean())
        else:
            hidden = float((1 - (fs * ft).sum(-1) / (fs.norm(dim=-1) * ft.norm(dim=-1))).mean())
    expected = 5.0 * soft_by_hand(s.logits, t.logits) + 2.0 * ce_by_hand(s.logits, LABELS) + 1.5 * hidden
    assert loss == pytest.approx(expected, rel=1e-10)


def test_weights_that_restate_alpha_and_feature_weight_give_the_default_loss():
    s, t = outputs64(0, (16, 16)), outputs64(1, (32, 32, 32))
    by_alpha = HiddenStateKD(HiddenParams(temperature=T, alpha=0.6, feature_weight=0.5))
    by_weights = HiddenStateKD(HiddenParams(temperature=T, weights={"soft": 0.6, "ce": 0.4, "hidden": 0.5}))
    for objective in (by_alpha, by_weights):
        objective.setup(student_model(), teacher_model())
        objective.modules.double()
    by_weights.modules.load_state_dict(by_alpha.modules.state_dict())
    with torch.no_grad():
        a = by_alpha.loss(s, t, LABELS, attention_mask=MASK).item()
        b = by_weights.loss(s, t, LABELS, attention_mask=MASK).item()
    assert b == pytest.approx(a, rel=1e-10)


def test_attention_weights_weigh_ce_and_the_attention_term():
    objective = AttentionKD(AttentionParams(temperature=T, weights={"ce": 1.0, "attention": 4.0}))
    objective.setup(student_model(), teacher_model())  # map {1: 2}
    g = torch.Generator().manual_seed(0)

    def maps(layers, heads):
        return tuple(torch.softmax(torch.randn(2, heads, 5, 5, generator=g, dtype=torch.float64), -1)
                     for _ in range(layers))

    s = SimpleNamespace(logits=outputs64(0, ()).logits, attentions=maps(1, 2))
    t = SimpleNamespace(logits=outputs64(1, ()).logits, attentions=maps(2, 4))
    entries = MASK.bool()[:, :, None] & MASK.bool()[:, None, :]
    mse = float(((s.attentions[0].mean(1) - t.attentions[1].mean(1))[entries] ** 2).mean())
    with torch.no_grad():
        loss = objective.loss(s, t, LABELS, attention_mask=MASK).item()
    assert loss == pytest.approx(ce_by_hand(s.logits, LABELS) + 4.0 * mse, rel=1e-10)


def test_weights_train_what_they_weigh():
    objective = HiddenStateKD(HiddenParams(weights={"hidden": 1.0}))  # no logit terms at all
    objective.setup(student_model(), teacher_model())
    s, t = outputs64(0, (16, 16)), outputs64(1, (32, 32, 32))
    s.logits.requires_grad_(True)
    objective.modules.double()
    objective.loss(s, t, LABELS, attention_mask=MASK).backward()
    assert s.logits.grad is None  # a term of weight 0 is not computed
    assert objective.modules["1"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method, params, fragment", [
    ("logit", {"weights": {"hidden": 1.0}}, "weights.hidden: this method has no hidden term; its terms: ce, soft"),
    ("hidden", {"weights": {"attention": 1.0}}, "weights.attention: this method has no attention term"),
    ("attention", {"weights": {"hidden": 1.0}}, "weights.hidden: this method has no hidden term"),
    ("logit", {"weights": {"cosine": 1.0}}, "weights.cosine: unknown key"),
    ("logit", {"weights": {}}, "give at least one term a weight above 0"),
    ("logit", {"weights": {"soft": 0.0}}, "give at least one term a weight above 0"),
    ("logit", {"weights": {"soft": -1.0}}, "weights.soft"),
    ("logit", {"weights": {"soft": 1.0}, "alpha": 0.5}, "weights replaces alpha"),
    ("hidden", {"weights": {"soft": 1.0}, "feature_weight": 2.0}, "weights replaces feature_weight"),
    ("progressive", {"weights": {"soft": 1.0}}, "weights.hidden: progressive's layer stages"),
])
def test_weights_a_method_cannot_take_are_refused_in_one_line(method, params, fragment):
    with pytest.raises(KdbenchError) as e:
        make_objective(method, params)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_without_weights_every_method_keeps_its_alpha_mix():
    for name in ("logit", "hidden", "attention", "progressive"):
        assert make_objective(name, {}).params.weights is None
    s, t = outputs64(0, ()), outputs64(1, ())
    alpha = make_objective("logit", {"temperature": T, "alpha": 0.7})
    with torch.no_grad():
        expected = 0.7 * soft_by_hand(s.logits, t.logits) + 0.3 * ce_by_hand(s.logits, LABELS)
        assert alpha.loss(s, t, LABELS).item() == pytest.approx(expected, rel=1e-10)
