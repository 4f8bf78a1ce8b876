"""The training loop (kdbench.train.loop): a few steps reduce the loss, with and without a teacher, and a run no
longer than its warmup says so."""

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

from kdbench.heads import TEACHER_LABEL
from kdbench.methods.logit import LogitKD
from kdbench.suite import TrainingSettings
from kdbench.train.loop import train
from tiny import tiny_bert


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
        return distiller.compute_loss(model, collate(rows)).item()


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

    from kdbench.train import loop

    for steps, warned in ((1, True), (2, False)):
        model = tiny_bert(seed=0)
        before = [p.detach().clone() for p in model.parameters()]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kdbench.train.loop"):
            loop.train(model, dataset(), collate, TrainingSettings(max_steps=steps, batch_size=4), seed=0,
                       device="cpu", description="probe")
        assert ("all of them warmup" in caplog.text) is warned
        moved = any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
        assert moved is not warned
