"""Multi-task distillation (kdbench.train.multitask): the shared encoder and the mixed-batch loss."""

import torch

from kdbench import heads
from kdbench.methods.base import DistillationConfig
from kdbench.methods.logit import LogitKD
from kdbench.suite import InlineConfig, TrainingSettings
from kdbench.train.distiller import Distiller
from kdbench.train.loop import training_arguments
from kdbench.train.multitask import MultiTaskDistiller, MultiTaskStudent, build_students
from tiny import BERT


def test_students_share_one_encoder_and_keep_their_heads():
    ref = InlineConfig(**BERT, hidden_size=8, intermediate_size=16)
    students = build_students(ref, [("a", 2), ("b", 3)], head=heads.get("classification"), vocab_size=30, seed=0)
    assert students["a"].bert is students["b"].bert
    assert (students["a"].classifier.out_features, students["b"].classifier.out_features) == (2, 3)
    both = MultiTaskStudent(students)
    encoder = sum(p.numel() for p in students["a"].bert.parameters())
    heads_only = sum(p.numel() for m in students.values() for p in m.classifier.parameters())
    assert sum(p.numel() for p in both.parameters()) == encoder + heads_only  # the encoder counted once


def test_a_mixed_batch_is_each_tasks_loss_weighted_by_its_rows(tmp_path):
    ref = InlineConfig(**BERT, hidden_size=8, intermediate_size=16)
    cls = heads.get("classification")
    students = build_students(ref, [("a", 2), ("b", 3)], head=cls, vocab_size=30, seed=0)
    teachers = build_students(InlineConfig(**BERT, hidden_size=16, intermediate_size=32), [("a", 2), ("b", 3)],
                              head=cls, vocab_size=30, seed=1)
    for m in students.values():
        m.eval()  # no dropout: the two computations must see the same forward
    config = DistillationConfig(temperature=2.0, alpha=0.5)
    parts = [(students[k], teachers[k], LogitKD(config), cls) for k in ("a", "b")]
    args = training_arguments(TrainingSettings(), seed=0, device="cpu", output_dir=str(tmp_path))
    mt = MultiTaskDistiller(model=MultiTaskStudent(students), args=args, parts=parts, head=cls)
    torch.manual_seed(0)
    ids = torch.randint(5, 30, (5, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([1, 0, 2, 1, 0]),
             "task": torch.tensor([0, 1, 1, 0, 1])}
    loss = mt.compute_loss(None, dict(batch))
    expected = 0.0
    for k, name in enumerate(("a", "b")):
        rows = batch["task"] == k
        single = Distiller(model=students[name], args=args, teacher=teachers[name], objective=LogitKD(config))
        part = {key: v[rows] for key, v in batch.items() if key != "task"}
        expected = expected + single.compute_loss(students[name], part) * rows.sum() / 5
    torch.testing.assert_close(loss, expected)
