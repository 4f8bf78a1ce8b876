"""The classification head's metric."""

import pytest

from kdbench.heads.classification import accuracy


def test_accuracy():
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == pytest.approx(0.5)
