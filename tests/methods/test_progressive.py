"""`progressive` (MobileBERT): layer stages (one pair's feature MSE, the layers below frozen), then logit KD."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from kdbench.errors import KdbenchError
from kdbench.methods.base import DistillationConfig
from kdbench.methods.logit import LogitKD
from kdbench.methods.progressive import ProgressiveKD, ProgressiveParams, progressive_schedule, progressive_stage
from kdbench.train.distiller import PROJECTIONS, Distiller, objective_attached
from kdbench.train.loop import train, training_arguments
from bert_pair import (SETTINGS, assert_plain, bert, collate, fixed_outputs, n_params, student_model, teacher_model,
                       train_rows)


def student_2l(seed: int = 0):
    return bert(2, 16, 2, seed)  # against the 2-layer teacher: uniform map {1: 1, 2: 2}, two layer stages


@pytest.mark.parametrize("max_steps, stages, fraction, plan", [
    (10, 2, 0.5, [3, 2, 5]),
    (4, 2, 0.5, [1, 1, 2]),
    (5, 2, 0.5, [1, 1, 3]),  # 2.5 final steps: halves round up
    (3, 2, 0.5, [0, 0, 3]),  # no step for every layer stage: logit KD alone
    (1, 2, 0.5, [0, 0, 1]),
    (1, 1, 0.01, [0, 1]),  # the final stage always gets a step
    (100, 3, 0.3, [24, 23, 23, 30]),  # 0.3 * 100 is 30.000000000000004 in floats, still 30
    (12, 4, 0.25, [3, 2, 2, 2, 3]),
    (7, 1, 1.0, [0, 7]),
    (0, 2, 0.5, [0, 0, 0]),
])
def test_progressive_schedule_is_pinned(max_steps, stages, fraction, plan):
    assert progressive_schedule(max_steps, stages, fraction) == plan
    assert sum(plan) == max_steps
    walked = [progressive_stage(step, plan) for step in range(max_steps + 2)]  # past the end: the final stage
    assert walked == [k for k, n in enumerate(plan[:-1], start=1) for _ in range(n)] + [None] * (plan[-1] + 2)


def test_progressive_setup_maps_layers_1_to_l_with_one_projection_each():
    objective = ProgressiveKD()
    objective.setup(student_2l(), teacher_model())
    assert objective.layer_map == {1: 1, 2: 2} and objective.stage is None
    assert {k: (m.in_features, m.out_features) for k, m in objective.modules.items()} == {"1": (16, 32),
                                                                                          "2": (16, 32)}
    assert objective.schedule(6) == [2, 1, 3]
    one = ProgressiveKD()
    one.setup(student_model(), teacher_model())
    assert one.layer_map == {1: 2} and list(one.modules) == ["1"]


def names_of(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


GROUPS = {"embeddings": ("bert.embeddings.",), "layer 1": ("bert.encoder.layer.0.",),
          "layer 2": ("bert.encoder.layer.1.",), "head": ("bert.pooler.", "classifier."),
          "W1": (f"{PROJECTIONS}.1.",), "W2": (f"{PROJECTIONS}.2.",)}


def group_of(name: str) -> str:
    """The part of a 2-layer BERT student (or of its attached projections) that a parameter belongs to."""
    [group] = [g for g, starts in GROUPS.items() if name.startswith(starts)]
    return group


def test_progressive_stages_split_a_bert_into_embeddings_and_layers():
    student, teacher = student_2l(), teacher_model()
    objective = ProgressiveKD()
    objective.setup(student, teacher)
    stages = [names_of(student, group) for group in objective.stage_parameters(student)]
    assert [{group_of(n) for n in names} for names in stages] == [
        {"embeddings", "layer 1"}, {"layer 2"}, {"embeddings", "layer 1", "layer 2", "head"}]
    assert stages[0] | stages[1] == {n for n in stages[2] if group_of(n) != "head"}
    assert stages[2] == {n for n, _ in student.named_parameters()}  # the final stage: everything

    # A sparse map: student layer 2 -> teacher layer 2 only. Its one stage trains both layers, and the embeddings.
    sparse = ProgressiveKD(ProgressiveParams(layer_map={2: 2}))
    sparse.setup(student, teacher)
    assert [{group_of(n) for n in names_of(student, g)} for g in sparse.stage_parameters(student)] == [
        {"embeddings", "layer 1", "layer 2"}, {"embeddings", "layer 1", "layer 2", "head"}]


def test_progressive_leaves_the_projections_out_of_the_student_groups():
    student, teacher = student_2l(), teacher_model()
    objective = ProgressiveKD()
    objective.setup(student, teacher)
    with objective_attached(student, teacher, objective):
        everything = objective.stage_parameters(student)[-1]
        assert len(everything) == len(list(student.parameters())) - len(list(objective.modules.parameters()))


def test_progressive_loss_is_one_pairs_mse_in_a_layer_stage_and_logit_kd_in_the_final_stage():
    objective = ProgressiveKD(ProgressiveParams(temperature=2.0, alpha=0.6, feature_weight=0.5))
    objective.setup(student_2l(), teacher_model())  # map {1: 1, 2: 2}
    s, t = fixed_outputs(0, (16, 16, 16)), fixed_outputs(1, (32, 32, 32))
    labels = torch.tensor([2, 0])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    logit = LogitKD(DistillationConfig(temperature=2.0, alpha=0.6))
    with torch.no_grad():
        final = objective.loss(s, t, labels, attention_mask=mask)  # stage None: outside training, the final stage
        assert final.item() == logit.loss(s, t, labels).item() > 0
        losses = []
        for stage, pair in [(1, (1, 1)), (2, (2, 2))]:
            objective.stage = stage
            lin = objective.modules[str(pair[0])]
            fs = s.hidden_states[pair[0]][mask.bool()] @ lin.weight.T + lin.bias  # (8 real tokens, 32)
            ft = t.hidden_states[pair[1]][mask.bool()]
            loss = objective.loss(s, t, labels, attention_mask=mask)
            assert loss.item() == pytest.approx(0.5 * F.mse_loss(fs, ft).item(), rel=1e-6)
            # The logits and labels take no part; neither do the other pair's hidden states nor padding.
            other = SimpleNamespace(logits=s.logits * 3 + 1, hidden_states=list(s.hidden_states))
            other.hidden_states[3 - pair[0]] = other.hidden_states[3 - pair[0]] + 7.0
            other.hidden_states[pair[0]] = other.hidden_states[pair[0]].clone()
            other.hidden_states[pair[0]][1, 4] = float("nan")
            assert objective.loss(other, t, torch.tensor([0, 1]), attention_mask=mask).item() == loss.item()
            losses.append(loss.item())
        assert losses[0] != losses[1]
    objective.stage = 1
    with pytest.raises(KdbenchError, match=r"^method 'progressive': the teacher returned no hidden states"):
        objective.loss(s, SimpleNamespace(logits=t.logits), labels)


class Recorder(TrainerCallback):
    """After every optimizer step: the student's parameters, which ones were trainable, and the objective's stage."""

    def __init__(self, objective):
        self.objective, self.params, self.trainable, self.stages = objective, [], [], []

    def snapshot(self, model):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        assert all(p.requires_grad for p in model.parameters())  # the optimizer is built from the trainable ones
        self.snapshot(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.snapshot(model)
        self.trainable.append({n for n, p in model.named_parameters() if p.requires_grad})
        self.stages.append(self.objective.stage)


def test_progressive_training_freezes_the_layers_below_and_trains_the_current_one(tmp_path):
    student, teacher = student_2l(), teacher_model()
    count = n_params(student)
    objective = ProgressiveKD(ProgressiveParams(final_fraction=0.5))
    recorder = Recorder(objective)
    args = training_arguments(SETTINGS, seed=0, device="cpu", output_dir=str(tmp_path), max_steps=4)
    Distiller(model=student, args=args, train_dataset=train_rows(), data_collator=collate, teacher=teacher,
              objective=objective, callbacks=[recorder]).train()

    assert recorder.stages == [1, 2, None, None]  # plan [1, 1, 2]
    expected = [{"embeddings", "layer 1", "W1"}, {"layer 2", "W2"},
                {"embeddings", "layer 1", "layer 2", "head"}, {"embeddings", "layer 1", "layer 2", "head"}]
    for step, (before, after, active) in enumerate(zip(recorder.params, recorder.params[1:], expected), start=1):
        moved = {n for n in after if not torch.equal(before[n], after[n])}
        assert {group_of(n) for n in moved} == active, step
        # Every weight matrix of a trained group moves (a bias may not: a key bias gets no gradient through softmax).
        assert {n for n in after if group_of(n) in active and after[n].dim() == 2} <= moved, step
        student_trainable = {group_of(n) for n in recorder.trainable[step - 1] if not n.startswith(PROJECTIONS)}
        assert student_trainable == active - {"W1", "W2"}, step

    assert all(p.requires_grad for p in student.parameters())  # trainable again for compression and recovery
    assert objective.stage is None
    assert_plain(student, count)


def test_progressive_recovery_shorter_than_the_stages_is_logit_kd_and_leaves_everything_trainable():
    student, teacher = student_2l(), teacher_model()
    objective = ProgressiveKD()
    train(student, train_rows(), collate, SETTINGS, seed=0, device="cpu", teacher=teacher, objective=objective,
          max_steps=3)  # plan [0, 0, 3]
    projections = objective.modules
    before = {k: v.clone() for k, v in projections.state_dict().items()}
    head = student.classifier.weight.clone()
    recovered = copy.deepcopy(student)
    stats = train(recovered, train_rows(), collate, SETTINGS, seed=0, device="cpu", teacher=teacher,
                  objective=objective, max_steps=2)
    assert stats.steps == 2
    assert objective.modules is projections  # setup kept them
    assert all(torch.equal(before[k], v) for k, v in projections.state_dict().items())  # no layer stage ran
    assert not torch.equal(head, recovered.classifier.weight)
    assert all(p.requires_grad for p in recovered.parameters()) and objective.stage is None
    assert_plain(recovered, n_params(student))


class StopAfterOneStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = True


def test_progressive_training_stopped_inside_a_layer_stage_leaves_everything_trainable(tmp_path):
    student, teacher = student_2l(), teacher_model()
    objective = ProgressiveKD()
    recorder = Recorder(objective)
    args = training_arguments(SETTINGS, seed=0, device="cpu", output_dir=str(tmp_path), max_steps=4)
    trainer = Distiller(model=student, args=args, train_dataset=train_rows(), data_collator=collate, teacher=teacher,
                        objective=objective, callbacks=[StopAfterOneStep(), recorder])
    trainer.train()
    assert trainer.state.global_step == 1 and recorder.stages == [1]
    assert not all(n in recorder.trainable[0] for n, _ in student.named_parameters())  # stage 1 froze layer 2
    assert all(p.requires_grad for p in student.parameters()) and objective.stage is None
