"""Fixtures of the method tests."""

import pytest

from kdbench.suite import TrainingSettings
from kdbench.train.distiller import Distiller
from kdbench.train.loop import training_arguments


@pytest.fixture
def make_distiller(tmp_path):
    """`make(student, teacher, objective)`: a Distiller with default training settings on the CPU."""

    def make(student, teacher, objective):
        args = training_arguments(TrainingSettings(), seed=0, device="cpu", output_dir=str(tmp_path))
        return Distiller(model=student, args=args, teacher=teacher, objective=objective)

    return make
