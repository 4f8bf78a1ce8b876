"""The heads registry, retention against the teacher, and which heads may cache a top-k teacher."""

import pytest

from kdbench import heads
from kdbench.errors import KdbenchError


def test_registry_names_the_culprit():
    with pytest.raises(KdbenchError, match="unknown head 'seq3seq'; available: causal_lm, classification"):
        heads.get("seq3seq")


def test_retention_is_one_for_the_teacher_and_less_when_worse():
    acc, ppl = heads.get("classification"), heads.get("causal_lm")
    assert acc.retention(0.8, 0.9) == pytest.approx(0.8 / 0.9) and ppl.retention(12.0, 6.0) == pytest.approx(0.5)
    assert acc.retention(0.9, 0.9) == ppl.retention(6.0, 6.0) == 1.0
    assert acc.retention(0.5, None) is None and not ppl.higher_is_better and acc.higher_is_better


def test_only_heads_whose_teacher_inputs_repeat_cache_a_top_k_teacher():
    """teacher_top_k needs vocabulary logits at inputs that are the same every epoch: a masked LM draws its masks
    per batch, and a classifier's logits are cached whole already."""
    cacheable = {kind for kind in heads.heads.names() if heads.get(kind).caches_teacher_top_k}
    assert cacheable == {"causal_lm", "seq2seq"}
