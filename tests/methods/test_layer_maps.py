"""Layer maps (kdbench.methods.layers): the uniform default, and a bad map refused at setup in one line."""

import pytest

from kdbench.errors import KdbenchError
from kdbench.methods import make_objective
from kdbench.methods.attention import AttentionKD
from kdbench.methods.hidden import HiddenStateKD
from kdbench.methods.layers import uniform_layer_map
from bert_pair import student_model, teacher_model


@pytest.mark.parametrize("ls, lt, expected", [
    (1, 2, {0: 0, 1: 2}),
    (2, 4, {0: 0, 1: 2, 2: 4}),
    (3, 12, {0: 0, 1: 4, 2: 8, 3: 12}),
    (4, 6, {0: 0, 1: 2, 2: 3, 3: 5, 4: 6}),  # 1.5 -> 2 and 4.5 -> 5: halves round up (Python's round gives 4)
    (2, 2, {0: 0, 1: 1, 2: 2}),
])
def test_default_layer_maps_are_pinned(ls, lt, expected):
    assert uniform_layer_map(ls, lt, embeddings=True) == expected
    assert uniform_layer_map(ls, lt, embeddings=False) == {k: v for k, v in expected.items() if k}


def test_setup_resolves_the_default_map_on_real_models():
    student, teacher = student_model(), teacher_model()
    hidden, attention = HiddenStateKD(), AttentionKD()
    hidden.setup(student, teacher)
    attention.setup(student, teacher)
    assert hidden.layer_map == {0: 0, 1: 2} and attention.layer_map == {1: 2}
    assert {k: (m.in_features, m.out_features) for k, m in hidden.modules.items()} == {"0": (16, 32), "1": (16, 32)}


@pytest.mark.parametrize("method, layer_map, message", [
    ("hidden", {0: 0, 2: 1}, ("params.layer_map: student index 2 is out of range (the student has 1 layer: "
                             "hidden-state indices 0..1, 0 = embeddings)")),
    ("hidden", {1: 3}, ("params.layer_map: teacher index 3 is out of range (the teacher has 2 layers: "
                       "hidden-state indices 0..2, 0 = embeddings)")),
    ("hidden", {-1: 0}, "student index -1 is out of range"),
    ("attention", {0: 0}, "params.layer_map: student index 0 is out of range (the student has 1 layer: layers 1..1)"),
    ("attention", {1: 5}, "teacher index 5 is out of range (the teacher has 2 layers: layers 1..2)"),
    ("hidden", {}, "params.layer_map is empty; leave it out for the uniform map"),
    ("progressive", {0: 0}, ("params.layer_map: student index 0 is out of range (the student has 1 layer: "
                            "layers 1..1)")),
    ("progressive", {1: 3}, "teacher index 3 is out of range (the teacher has 2 layers: layers 1..2)"),
    ("progressive", {}, "params.layer_map is empty; leave it out for the uniform map"),
])
def test_a_bad_layer_map_fails_at_setup_in_one_line_naming_the_index(make_distiller, method, layer_map, message):
    objective = make_objective(method, {"layer_map": layer_map})
    with pytest.raises(KdbenchError) as e:
        make_distiller(student_model(), teacher_model(), objective)  # the Distiller sets the objective up
    assert message in str(e.value) and str(e.value).startswith(f"method {method!r}: ")
    assert "\n" not in str(e.value)
