"""Distiller: the transformers.Trainer whose compute_loss is the distillation loss, and nothing else."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback, default_data_collator
from transformers.modeling_outputs import SequenceClassifierOutput

from kdbench.errors import KdbenchError, NonFiniteLossError
from kdbench.heads import TEACHER_LABEL
from kdbench.kernels import kd_loss
from kdbench.methods.base import DistillationConfig
from kdbench.methods.logit import LogitKD
from kdbench.suite import TrainingSettings
from kdbench.train.loop import train
from tiny import labelled_batch as inputs_for
from tiny import tiny_bert


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits are given: (N, C) = scale * base, whatever the inputs (one row per input)."""

    def __init__(self, base):
        super().__init__()
        self.register_buffer("base", torch.as_tensor(base, dtype=torch.float32))
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, input_ids=None, attention_mask=None, output_hidden_states=False, output_attentions=False):
        return SequenceClassifierOutput(logits=self.scale * self.base[: input_ids.shape[0]])


def loss_of(distiller, model, inputs) -> torch.Tensor:
    return distiller.compute_loss(model, dict(inputs))  # compute_loss pops labels: pass a copy


# ---------------------------------------------------------------------------------------------------------------
# The loss


def test_pinned_value_by_hand(make_distiller):
    """Student (0, 0), teacher (0, ln 3), label 0, T = 1, alpha = 1/2:
    p_t = (1/4, 3/4), p_s = (1/2, 1/2); KL = 1/4 ln(1/2) + 3/4 ln(3/2); CE = ln 2;
    loss = KL / 2 + ln 2 / 2 = 3/8 ln 3."""
    student, teacher = FixedLogits([[0.0, 0.0]]), FixedLogits([[0.0, math.log(3.0)]])
    d = make_distiller(student, teacher, distillation=DistillationConfig(temperature=1.0, alpha=0.5))
    loss = loss_of(d, student, inputs_for(1, [0]))
    assert loss.item() == pytest.approx(3 / 8 * math.log(3), rel=1e-6)


def test_temperature_scales_the_soft_term_only(make_distiller):
    """Against plain torch.nn.functional: alpha T^2 KL(p_t || p_s) at T + (1 - alpha) CE at T = 1, batchmean over
    valid rows (label -100 drops out)."""
    s = torch.tensor([[1.0, -0.5, 0.25], [0.3, 2.0, -1.0], [-0.7, 0.1, 0.9], [0.5, 0.5, -2.0]])
    t = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.5, 0.5], [-1.0, -1.0, 3.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 2, -100, 1])
    T, alpha = 2.0, 0.7
    valid = labels != -100
    kl = F.kl_div(F.log_softmax(s[valid] / T, -1), F.log_softmax(t[valid] / T, -1), log_target=True,
                  reduction="batchmean")
    expected = alpha * T**2 * kl + (1 - alpha) * F.cross_entropy(s[valid], labels[valid])

    student, teacher = FixedLogits(s), FixedLogits(t)
    d = make_distiller(student, teacher, distillation=DistillationConfig(temperature=T, alpha=alpha))
    loss = loss_of(d, student, inputs_for(4, labels.tolist()))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(
        kd_loss(s, t, labels, temperature=T, alpha=alpha).item(), rel=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_equals_kd_loss_on_real_models(make_distiller, divergence):
    student, teacher = tiny_bert(0), tiny_bert(1, hidden=32)
    student.eval()
    inputs = inputs_for(5, [0, 1, 2, 1, 0])
    params = DistillationConfig(temperature=3.0, alpha=0.4, divergence=divergence, beta=0.3)
    d = make_distiller(student, teacher, objective=LogitKD(params))
    loss = loss_of(d, student, inputs)
    model_in = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        expected = kd_loss(student(**model_in).logits, teacher(**model_in).logits, inputs["labels"],
                           temperature=3.0, alpha=0.4, divergence=divergence, beta=0.3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_transfer_rows_take_the_teachers_argmax(make_distiller):
    s = torch.tensor([[0.2, 0.1, -0.3], [1.0, 0.0, 0.5]])
    t = torch.tensor([[0.0, 0.0, 4.0], [3.0, 0.0, 0.0]])  # argmax: 2, 0
    student, teacher = FixedLogits(s), FixedLogits(t)
    d = make_distiller(student, teacher, distillation=DistillationConfig(temperature=2.0, alpha=0.5))
    unlabelled = loss_of(d, student, inputs_for(2, [TEACHER_LABEL, TEACHER_LABEL]))
    assert unlabelled.item() == pytest.approx(loss_of(d, student, inputs_for(2, [2, 0])).item(), rel=1e-6)
    assert unlabelled.item() != pytest.approx(loss_of(d, student, inputs_for(2, [1, 1])).item(), rel=1e-3)
    mixed = loss_of(d, student, inputs_for(2, [1, TEACHER_LABEL]))
    assert mixed.item() == pytest.approx(loss_of(d, student, inputs_for(2, [1, 0])).item(), rel=1e-6)


def test_cached_teacher_logits_give_the_same_loss_without_a_teacher_forward(make_distiller, monkeypatch):
    student, teacher = tiny_bert(0), tiny_bert(1)
    student.eval()
    inputs = inputs_for(4, [0, TEACHER_LABEL, 2, TEACHER_LABEL])
    d = make_distiller(student, teacher, distillation=DistillationConfig(temperature=2.0, alpha=0.5))
    direct = loss_of(d, student, inputs)

    with torch.no_grad():
        t_logits = teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits

    def no_forward(*args, **kwargs):
        raise AssertionError("the teacher ran although its logits were given")

    monkeypatch.setattr(teacher, "forward", no_forward)
    cached = loss_of(d, student, {**inputs, "teacher_logits": t_logits})
    assert cached.item() == pytest.approx(direct.item(), rel=1e-6)


def test_without_a_teacher_it_is_cross_entropy(make_distiller):
    s = torch.tensor([[1.0, -0.5, 0.25], [0.3, 2.0, -1.0], [-0.7, 0.1, 0.9]])
    labels = [2, -100, 0]
    student = FixedLogits(s)
    d = make_distiller(student)
    assert d.teacher is None and d.objective is None
    expected = F.cross_entropy(s, torch.tensor(labels), ignore_index=-100)
    assert loss_of(d, student, inputs_for(3, labels)).item() == pytest.approx(expected.item(), rel=1e-6)


def test_return_outputs_gives_the_students_logits(make_distiller):
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    student = FixedLogits(s)
    d = make_distiller(student, FixedLogits(-s))
    loss, out = d.compute_loss(student, inputs_for(2, [0, 1]), return_outputs=True)
    assert torch.equal(out.logits.detach(), s) and loss.ndim == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("with_teacher", [False, True])
def test_non_finite_loss_stops_with_a_user_error(make_distiller, bad, with_teacher):
    student = FixedLogits([[0.0, bad], [0.0, 1.0]])
    d = make_distiller(student, FixedLogits([[0.0, 1.0], [1.0, 0.0]]) if with_teacher else None)
    with pytest.raises(NonFiniteLossError) as info:
        loss_of(d, student, inputs_for(2, [0, 1]))
    assert isinstance(info.value, KdbenchError)  # recorded as a failed run, exit code 2
    message = str(info.value)
    assert message.startswith("loss is ") and message.endswith(" at step 1; run stopped")
    assert float(message.split()[2]) != float(message.split()[2]) or math.isinf(float(message.split()[2]))


class FreezeThenDiverge(LogitKD):
    """A scheduled objective that freezes the student's first layer, then diverges: how a staged run can stop."""

    def callbacks(self):
        class Freeze(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, **kwargs):
                model.bert.embeddings.requires_grad_(False)

        return [Freeze()]

    def loss(self, student_out, teacher_out, labels):
        return super().loss(student_out, teacher_out, labels) * float("nan")


def test_a_run_that_stops_hands_back_the_student_as_trainable_as_it_came(tmp_path):
    student, teacher = tiny_bert(0), tiny_bert(1)
    student.classifier.requires_grad_(False)  # frozen before training: stays frozen
    batch = inputs_for(4, [0, 1, 2, 0])
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]

    with pytest.raises(NonFiniteLossError):
        train(student, rows, default_data_collator, TrainingSettings(max_steps=2, batch_size=4), seed=0,
              device="cpu", teacher=teacher, objective=FreezeThenDiverge())
    assert all(p.requires_grad for p in student.bert.parameters())
    assert not any(p.requires_grad for p in student.classifier.parameters())


# ---------------------------------------------------------------------------------------------------------------
# The teacher is frozen


def test_teacher_is_frozen_and_stays_in_eval_mode(make_distiller):
    student, teacher = tiny_bert(0), tiny_bert(1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = make_distiller(student, teacher)
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())

    teacher.train()  # as Trainer.train() does to every module it sees
    student.train()
    loss = loss_of(d, student, inputs_for(3, [0, 1, TEACHER_LABEL]))
    assert not teacher.training
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
