"""`attention` (Zagoruyko & Komodakis; TinyBERT): head-averaged attention maps of real entries, plus logit KD."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.methods import make_objective
from kdbench.methods.attention import AttentionKD, AttentionParams
from kdbench.train.distiller import objective_attached
from bert_pair import inputs_for, student_model, teacher_model


def test_attention_maps_come_back_while_training_and_the_models_are_restored_after():
    student, teacher = student_model(), teacher_model()
    assert teacher.config._attn_implementation == "sdpa"  # the default: no attention maps in transformers 5
    objective = AttentionKD()
    objective.setup(student, teacher)
    ids = inputs_for()
    model_in = {k: ids[k] for k in ("input_ids", "attention_mask")}
    with objective_attached(student, teacher, objective):
        assert student.config._attn_implementation == teacher.config._attn_implementation == "eager"
        with torch.no_grad():
            attn = teacher(**model_in, output_attentions=True).attentions
        assert attn is not None and len(attn) == 2 and all(a is not None for a in attn)
        assert attn[0].shape == (4, 4, 7, 7)
    assert student.config._attn_implementation == teacher.config._attn_implementation == "sdpa"


def test_attention_loss_outside_eager_attention_is_one_line_naming_the_fix(make_distiller):
    student, teacher = student_model(), teacher_model()
    d = make_distiller(student, teacher, AttentionKD())
    with pytest.raises(KdbenchError, match=r"^method 'attention': the student returned no attention maps; it needs "
                                           r"attn_implementation='eager' \(SDPA returns none\)$"):
        d.compute_loss(student, inputs_for())


def test_attention_loss_is_finite_and_positive_and_trains_the_student_only(make_distiller):
    student, teacher = student_model(), teacher_model()
    objective = AttentionKD(AttentionParams(feature_weight=10.0))
    d = make_distiller(student, teacher, objective)
    with objective_attached(student, teacher, objective):
        loss = d.compute_loss(student, inputs_for())
        logit_only = make_objective("logit", {}).loss(
            student(**{k: v for k, v in inputs_for().items() if k != "labels"}),
            teacher(**{k: v for k, v in inputs_for().items() if k != "labels"}), inputs_for()["labels"])
    assert math.isfinite(loss.item()) and loss.item() > logit_only.item() > 0
    loss.backward()
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_attention_features_leave_out_padding_rows_and_columns():
    objective = AttentionKD()
    objective.setup(student_model(), teacher_model())  # map {1: 2}
    g = torch.Generator().manual_seed(0)
    s_attn = (torch.rand(2, 2, 4, 4, generator=g),)
    t_attn = (torch.rand(2, 4, 4, 4, generator=g), torch.rand(2, 4, 4, 4, generator=g))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    fs, ft = objective.features(s_attn, t_attn, mask)
    assert fs.shape == ft.shape == (16 + 4, 1)  # 4x4 real entries of sequence 0, 2x2 of sequence 1
    assert torch.equal(fs[16:, 0], s_attn[0][1].mean(0)[:2, :2].flatten())
    assert torch.equal(ft[:16, 0], t_attn[1][0].mean(0).flatten())


def test_attention_of_identical_models_is_exactly_zero(make_distiller):
    teacher = teacher_model()
    student = copy.deepcopy(teacher)
    objective = AttentionKD(AttentionParams(alpha=0.0, feature_weight=10.0))
    d = make_distiller(student, teacher, objective)
    student.eval()
    inputs = inputs_for()
    model_in = {k: v for k, v in inputs.items() if k != "labels"}
    with objective_attached(student, teacher, objective), torch.no_grad():
        so = student(**model_in, output_attentions=True)
        to = teacher(**model_in, output_attentions=True)
        fs, ft = objective.features(so.attentions, to.attentions, inputs["attention_mask"])
        loss = d.compute_loss(student, dict(inputs))  # it pops the labels
        pure_kd = AttentionKD(AttentionParams(alpha=1.0, feature_weight=10.0))
        pure_kd.setup(student, teacher)
        soft = pure_kd.loss(so, to, inputs["labels"], attention_mask=inputs["attention_mask"])
    assert objective.layer_map == {1: 1, 2: 2} and torch.equal(fs, ft)  # the attention term is exactly 0
    assert loss.item() == F.cross_entropy(so.logits, inputs["labels"]).item()  # alpha = 0: CE alone
    assert soft.item() == 0.0  # alpha = 1: KL of identical logits, plus attention: 0
