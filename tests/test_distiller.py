"""Distiller: the transformers.Trainer whose compute_loss is the distillation loss, and nothing else."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, default_data_collator
from transformers.modeling_outputs import SequenceClassifierOutput

from kdbench.errors import KdbenchError, NonFiniteLossError
from kdbench.kernels import kd_loss
from kdbench.methods import DistillationConfig, LogitKD
from kdbench.suite import TrainingSettings
from kdbench.tasks import TEACHER_LABEL
from kdbench.trainer import Distiller, cache_teacher_logits, train, training_arguments


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits are given: (N, C) = scale * base, whatever the inputs (one row per input)."""

    def __init__(self, base):
        super().__init__()
        self.register_buffer("base", torch.as_tensor(base, dtype=torch.float32))
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, input_ids=None, attention_mask=None, output_hidden_states=False, output_attentions=False):
        return SequenceClassifierOutput(logits=self.scale * self.base[: input_ids.shape[0]])


def tiny_bert(seed: int, hidden: int = 16, vocab: int = 40) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)




@pytest.fixture
def make_distiller(tmp_path):
    def make(student, teacher=None, **kwargs):
        args = training_arguments(TrainingSettings(), seed=0, device="cpu", output_dir=str(tmp_path))
        return Distiller(model=student, args=args, teacher=teacher, **kwargs)

    return make


def inputs_for(n: int, labels, seq: int = 6, vocab: int = 40) -> dict:
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(5, vocab, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels)}


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


def test_cache_teacher_logits_matches_the_teacher():
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0, "a": 1}, "[PAD]")),
                                  pad_token="[PAD]")
    teacher = tiny_bert(1)
    rows = [{"input_ids": [5 + i, 6, 7][: 1 + i % 3], "attention_mask": [1] * (1 + i % 3), "labels": i % 3}
            for i in range(5)]
    out = cache_teacher_logits(teacher, rows, DataCollatorWithPadding(tok), "cpu", batch_size=2)
    assert [r["labels"] for r in out] == [r["labels"] for r in rows]
    with torch.no_grad():
        for r, o in zip(rows, out):
            single = teacher(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            assert torch.allclose(torch.tensor(o["teacher_logits"]), single, atol=1e-5)


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


def dataset(n: int = 24, seq: int = 6, vocab: int = 40) -> list[dict]:
    """Rows whose label is a function of the first token: learnable in a few steps."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (n, seq), generator=g)
    return [{"input_ids": r.tolist(), "attention_mask": [1] * seq, "labels": int(r[0]) % 3} for r in ids]


def collate(rows: list[dict]) -> dict:
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def mean_loss(distiller, model, rows) -> float:
    model.eval()
    with torch.no_grad():
        return loss_of(distiller, model, collate(rows)).item()


class RuleTeacher(torch.nn.Module):
    """A teacher that knows the rule of `dataset()`: confident logits for class (first token % 3)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, input_ids=None, attention_mask=None, output_hidden_states=False, output_attentions=False):
        self.calls += 1
        return SequenceClassifierOutput(logits=4.0 * F.one_hot(input_ids[:, 0] % 3, 3).float())


@pytest.mark.parametrize("with_teacher", [False, True], ids=["alone", "distilled"])
def test_a_few_steps_reduce_the_loss(make_distiller, with_teacher):
    rows = dataset()
    for r in rows[::2]:
        r["labels"] = TEACHER_LABEL  # half the rows unlabelled: a transfer set (dropped when alone)
    if not with_teacher:
        rows = rows[1::2]
    student = tiny_bert(0)
    teacher = RuleTeacher() if with_teacher else None
    probe = make_distiller(student, teacher)
    before = mean_loss(probe, student, rows)
    settings = TrainingSettings(max_steps=30, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0)
    stats = train(student, rows, collate, settings, seed=0, device="cpu", teacher=teacher,
                  objective=LogitKD() if teacher is not None else None)
    assert stats.steps == 30 and stats.samples == 30 * 8
    after = mean_loss(probe, student, rows)
    assert after < 0.5 * before, (before, after)
    if teacher is not None:
        assert teacher.calls >= 30 and not teacher.training


def test_a_run_no_longer_than_its_warmup_says_so(tmp_path, caplog):
    """Linear warmup starts at learning rate 0: one step of warmup leaves the model as it was, and the log says so
    (two steps do train: the second is past the warmup)."""
    import logging

    from kdbench import trainer as trainer_module
    from kdbench.suite import TrainingSettings

    for steps, warned in ((1, True), (2, False)):
        model = tiny_bert(seed=0)
        before = [p.detach().clone() for p in model.parameters()]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kdbench.trainer"):
            trainer_module.train(model, dataset(), collate, TrainingSettings(max_steps=steps, batch_size=4),
                                 seed=0, device="cpu", description="probe")
        assert ("all of them warmup" in caplog.text) is warned
        moved = any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
        assert moved is not warned
