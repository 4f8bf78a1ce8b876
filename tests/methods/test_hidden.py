"""`hidden` (FitNets / TinyBERT): hidden states of real tokens through learned projections, plus logit KD. The
loss is checked against kd_loss with features computed by hand."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from kdbench.kernels import kd_loss
from kdbench.methods import make_objective
from kdbench.methods.hidden import HiddenParams, HiddenStateKD
from kdbench.train.loop import train
from bert_pair import (SETTINGS, assert_plain, collate, fixed_outputs, inputs_for, n_params, student_model,
                       teacher_model, train_rows)


def test_hidden_loss_equals_kd_loss_with_features_by_hand():
    params = HiddenParams(temperature=2.0, alpha=0.6, feature_weight=0.5)
    objective = HiddenStateKD(params)
    objective.setup(student_model(), teacher_model())  # map {0: 0, 1: 2}, projections 16 -> 32
    s, t = fixed_outputs(0, (16, 16)), fixed_outputs(1, (32, 32, 32))
    labels = torch.tensor([2, 0])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    real = [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1), (1, 2)]

    fs, ft = [], []
    for si, ti in [(0, 0), (1, 2)]:
        lin = objective.modules[str(si)]
        for b, pos in real:
            fs.append(s.hidden_states[si][b, pos] @ lin.weight.T + lin.bias)
            ft.append(t.hidden_states[ti][b, pos])
    fs, ft = torch.stack(fs), torch.stack(ft)  # (8 real tokens * 2 pairs, 32)
    with torch.no_grad():
        expected = kd_loss(s.logits, t.logits, labels, temperature=2.0, alpha=0.6, student_features=fs,
                           teacher_features=ft, feature_weight=0.5)
        loss = objective.loss(s, t, labels, attention_mask=mask)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        logit_only = kd_loss(s.logits, t.logits, labels, temperature=2.0, alpha=0.6)
        assert (loss - logit_only).item() == pytest.approx(0.5 * F.mse_loss(fs, ft).item(), rel=1e-5)

        # A pad position's hidden states, student's or teacher's, do not count.
        s.hidden_states[0][1, 3] += 100.0
        s.hidden_states[1][1, 4] = -50.0
        t.hidden_states[2][1, 3] = 1e3
        t.hidden_states[1][1, 4] = float("nan")  # an unmapped layer, and a pad: never read
        assert objective.loss(s, t, labels, attention_mask=mask).item() == loss.item()
        # ... but a real one does.
        s.hidden_states[1][1, 2] += 1.0
        assert objective.loss(s, t, labels, attention_mask=mask).item() != loss.item()


def test_hidden_without_a_mask_uses_every_token_and_feature_weight_0_is_logit_kd():
    objective = HiddenStateKD(HiddenParams(layer_map={1: 1}))
    objective.setup(student_model(), teacher_model())
    s, t = fixed_outputs(0, (16, 16)), fixed_outputs(1, (32, 32, 32))
    fs, ft = objective.features(s.hidden_states, t.hidden_states)
    assert fs.shape == ft.shape == (2 * 5, 32)
    weightless = HiddenStateKD(HiddenParams(feature_weight=0.0))
    labels = torch.tensor([0, 1])
    expected = kd_loss(s.logits, t.logits, labels, temperature=4.0, alpha=0.7)
    assert weightless.loss(s, t, labels).item() == expected.item()  # no setup needed: no features computed


def test_hidden_gradients_reach_the_projections_and_the_student_not_the_teacher(make_distiller):
    student, teacher = student_model(), teacher_model()
    objective = HiddenStateKD()
    d = make_distiller(student, teacher, objective)
    loss = d.compute_loss(student, inputs_for())
    loss.backward()
    for name, p in objective.modules.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert student.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert student.bert.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_training_trains_the_projections_and_leaves_a_plain_student():
    student, teacher = student_model(), teacher_model()
    count, keys = n_params(student), list(student.state_dict())
    objective = HiddenStateKD()
    objective.setup(student, teacher)
    projections = objective.modules
    before = {k: v.clone() for k, v in projections.state_dict().items()}
    embeddings = student.bert.embeddings.word_embeddings.weight.clone()

    stats = train(student, train_rows(), collate, SETTINGS, seed=0, device="cpu", teacher=teacher,
                  objective=objective)
    assert stats.steps == 3
    assert objective.modules is projections  # setup kept what it had built
    assert all(not torch.equal(before[k], v) for k, v in projections.state_dict().items())
    assert not torch.equal(embeddings, student.bert.embeddings.word_embeddings.weight)
    assert_plain(student, count)
    assert list(student.state_dict()) == keys

    # Recovery after pruning trains a copy of the student with the same objective: the projections go on.
    copy_ = copy.deepcopy(student)
    mid = {k: v.clone() for k, v in projections.state_dict().items()}
    train(copy_, train_rows(), collate, SETTINGS, seed=0, device="cpu", teacher=teacher, objective=objective,
          max_steps=2)
    assert objective.modules is projections
    assert all(not torch.equal(mid[k], v) for k, v in projections.state_dict().items())
    assert_plain(copy_, count)
    out = copy_(**{k: v for k, v in inputs_for().items() if k != "labels"}, output_hidden_states=True)
    assert len(out.hidden_states) == 2  # transformers hooks it again when asked


@pytest.mark.parametrize("method", ["hidden", "attention"])
def test_recovery_after_structured_pruning(method):
    """prune_structured removes heads and FFN neurons but keeps the hidden width: the same objective still fits."""
    from kdbench.compress import apply_variant

    student, teacher = student_model(), teacher_model()
    objective = make_objective(method, {})
    train(student, train_rows(), collate, SETTINGS, seed=0, device="cpu", teacher=teacher, objective=objective,
          max_steps=1)
    pruned, _ = apply_variant(student, [("prune_structured", {"amount": 0.5})], "cpu")
    assert pruned.config.num_attention_heads < student.config.num_attention_heads
    count = n_params(pruned)
    stats = train(pruned, train_rows(), collate, SETTINGS, seed=0, device="cpu", teacher=teacher,
                  objective=objective, max_steps=2)
    assert stats.steps == 2
    assert_plain(pruned, count)
    torch.save(teacher, io.BytesIO())
    assert pruned.config._attn_implementation == teacher.config._attn_implementation == "sdpa"
