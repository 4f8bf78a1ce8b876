"""Several teachers as one (kdbench.train.ensemble): the soft targets at T are the weighted average of the teachers'
probabilities (or the softmax of their weighted average logits), checked against a hand computation."""

import math
from types import SimpleNamespace

import pytest
import torch

from kdbench.train.ensemble import TeacherEnsemble, average_logits


def hand_softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(z / temperature) for z in row]
    return [e / math.fsum(exps) for e in exps]


A = [[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]]
B = [[-0.5, 1.5, 1.0], [1.0, 1.0, 4.0]]
WEIGHTS, T = [3.0, 1.0], 2.0  # normalised: 0.75 and 0.25


def test_probs_average_is_the_weighted_mean_of_the_teachers_probabilities_at_t():
    out = average_logits([torch.tensor(A, dtype=torch.float64), torch.tensor(B, dtype=torch.float64)], WEIGHTS, T)
    assert out.dtype == torch.float64
    got = torch.softmax(out / T, dim=-1)
    for row, (a, b) in enumerate(zip(A, B)):
        pa, pb = hand_softmax(a, T), hand_softmax(b, T)
        want = [0.75 * x + 0.25 * y for x, y in zip(pa, pb)]
        assert got[row].tolist() == pytest.approx(want, abs=1e-12)


def test_logits_average_is_the_softmax_of_the_weighted_mean_logits():
    out = average_logits([torch.tensor(A, dtype=torch.float64), torch.tensor(B, dtype=torch.float64)], WEIGHTS, T,
                         "logits")
    got = torch.softmax(out / T, dim=-1)
    for row, (a, b) in enumerate(zip(A, B)):
        want = hand_softmax([0.75 * x + 0.25 * y for x, y in zip(a, b)], T)
        assert got[row].tolist() == pytest.approx(want, abs=1e-12)
    # the two averages differ: the choice is not a no-op
    probs = torch.softmax(average_logits([torch.tensor(A), torch.tensor(B)], WEIGHTS, T) / T, dim=-1)
    assert not torch.allclose(probs, got.float(), atol=1e-3)


class Fixed(torch.nn.Module):
    """A teacher with fixed logits that accepts only `input_ids` (as DistilBERT takes no token_type_ids)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float64)
        self.seen = None

    def forward(self, input_ids):
        self.seen = input_ids
        return SimpleNamespace(logits=self.logits[: len(input_ids)].clone(), hidden_states=None)


class WithTypes(Fixed):
    def forward(self, input_ids, token_type_ids=None):
        assert token_type_ids is not None
        return super().forward(input_ids)


def test_the_ensemble_runs_each_teacher_on_its_own_inputs_and_replaces_the_logits():
    first, second = Fixed(A), WithTypes(B)
    ensemble = TeacherEnsemble([first, second], WEIGHTS, T)
    from kdbench.models import model_inputs

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "token_type_ids": torch.zeros(2, 3, dtype=torch.long),
             "labels": torch.zeros(2)}
    out = ensemble(**model_inputs(batch, ensemble))  # labels dropped, token_type_ids kept for the one that takes it
    assert first.seen is not None and second.seen is not None
    want = average_logits([torch.tensor(A, dtype=torch.float64), torch.tensor(B, dtype=torch.float64)], WEIGHTS, T)
    assert torch.equal(out.logits, want)
