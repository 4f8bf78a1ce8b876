"""What the method tests share: a tiny BERT teacher (2 layers x 32, 4 heads) and student (1 layer x 16, 2 heads),
no dropout; their batches, with padding; and what a student must be after training."""

import io
from types import SimpleNamespace

import torch
from transformers import BertConfig, BertForSequenceClassification

from kdbench.suite import TrainingSettings
from kdbench.train.distiller import PROJECTIONS


def bert(layers: int, hidden: int, heads: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def teacher_model(seed: int = 1):
    return bert(2, 32, 4, seed)


def student_model(seed: int = 0):
    return bert(1, 16, 2, seed)


def inputs_for(n: int = 4, seq: int = 7) -> dict:
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(5, 40, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding, as DataCollatorWithPadding leaves it
    mask[1, -1:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % 3}


def fixed_outputs(seed: int, widths: tuple[int, ...], batch: int = 2, seq: int = 5, classes: int = 3):
    """Model outputs with fixed random logits (B, C) and hidden states (B, L, width) per width."""
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(logits=torch.randn(batch, classes, generator=g),
                           hidden_states=tuple(torch.randn(batch, seq, w, generator=g) for w in widths))


def train_rows(n: int = 16, seq: int = 7) -> list[dict]:
    batch = inputs_for(n, seq)
    return [{k: v[i].tolist() for k, v in batch.items()} for i in range(n)]


def collate(rows: list[dict]) -> dict:
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


SETTINGS = TrainingSettings(max_steps=3, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_plain(model, count: int) -> None:
    """No projections left, the same parameter count, and picklable (the profiler pickles models): transformers'
    output-capturing hooks, local closures that it installs on the first call for hidden states, are gone."""
    assert not hasattr(model, PROJECTIONS) and PROJECTIONS not in dict(model.named_children())
    assert n_params(model) == count
    torch.save(model, io.BytesIO())
