"""What every method shares (kdbench.methods.base): params validated against the method's own schema, the registry
as `kdbench ls methods` lists it, and the interface the runner asks through."""

import pytest
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.errors import KdbenchError
from kdbench.methods import make_objective, methods
from kdbench.methods.base import Decoding, SparseTeacher


def test_params_are_validated_against_the_methods_own_schema():
    assert make_objective("hidden", {"layer_map": {"1": "2"}}).params.layer_map == {1: 2}  # as JSON gives it back
    with pytest.raises(KdbenchError, match=r"^method 'hidden': params.feature_weigth: unknown key$"):
        make_objective("hidden", {"feature_weigth": 1.0})
    with pytest.raises(KdbenchError, match=r"^method 'attention': params.feature_weight: "):
        make_objective("attention", {"feature_weight": -1.0})
    for bad in ({"final_fraction": 0.0}, {"final_fraction": 1.5}, {"feature_weight": 0.0}):
        with pytest.raises(KdbenchError, match=rf"^method 'progressive': params.{next(iter(bad))}: "):
            make_objective("progressive", bad)


def ls_entries(stdout: str) -> dict[str, tuple[str, list[str]]]:
    """`kdbench ls`'s entries, {name: (description, parameter lines)}: a description wraps onto lines indented by 27
    spaces, the parameters follow one per line, indented by 28."""
    entries = {}
    for line in stdout.splitlines():
        if line and not line[0].isspace():
            name, description = line.split(None, 1)
            entries[name] = (description, [])
        elif line.startswith(" " * 28):
            entries[name][1].append(line.strip())
        else:
            entries[name] = (f"{entries[name][0]} {line.strip()}", entries[name][1])
    return entries


def test_ls_methods_lists_each_with_its_description_and_params():
    result = CliRunner().invoke(app, ["ls", "methods"])
    assert result.exit_code == 0
    entries = ls_entries(result.stdout)
    assert sorted(entries) == methods.names()
    for name, starts in [
        ("hidden", "Hidden-state matching through learned projections"),
        ("attention", "Attention-map transfer (Zagoruyko & Komodakis 2017"),
        ("progressive", "Progressive layer-by-layer transfer (MobileBERT), then logit KD of the whole student."),
    ]:
        description, params = entries[name]
        assert description == methods.describe(name) and description.startswith(starts), name
        assert params == methods.describe_params(name), name
        fields = [line.split(":")[0] for line in params]
        assert fields[:4] == ["temperature", "alpha", "divergence", "beta"], name  # the logit terms every method shares
        assert {"feature_weight", "layer_map", "decoder_layer_map"} <= set(fields), name
        # progressive's layer stages read the student's logits: it has no fused_linear
        assert ("fused_linear" in fields) is (name != "progressive"), name
    own = {name: {line.split(":")[0] for line in entries[name][1]} for name in ("attention", "progressive")}
    assert "cross_attention" in own["attention"] and "final_fraction" in own["progressive"]


# ---------------------------------------------------------------------------------------------------------------
# What the runner asks: each method answers through the base interface, so the runner names no method


def test_the_runner_asks_each_method_what_it_needs():
    logit = make_objective("logit", {})
    assert (logit.sparse_teacher, logit.teacher_decoding, logit.student_decoding) == (None, None, None)
    assert logit.teacher_logits_suffice and not logit.fused_linear
    assert make_objective("logit", {"teacher_top_k": 8, "temperature": 2.0}).sparse_teacher == SparseTeacher(
        "teacher_top_k", 8, 2.0)
    assert make_objective("logit", {"teacher_samples": 4}).sparse_teacher == SparseTeacher("teacher_samples", 4, 4.0)
    assert make_objective("logit", {"fused_linear": True}).fused_linear
    for name in ("hidden", "attention", "progressive"):
        assert not make_objective(name, {}).teacher_logits_suffice, name  # they read the teacher's features
    assert not make_objective("progressive", {}).fused_linear  # its schema has no such key
    seq = make_objective("sequence", {"num_beams": 3, "prompt_length": 6, "prompt_loss": True})
    assert seq.teacher_decoding == Decoding("sequence-level KD", num_beams=3, prompt_length=6, prompt_loss=True)
    assert seq.student_decoding is None and seq.sparse_teacher is None
    gkd = make_objective("on_policy", {"max_new_tokens": 5, "sample_temperature": 0.5})
    assert gkd.student_decoding == Decoding("on-policy KD", max_new_tokens=5, sample_temperature=0.5)
    assert gkd.teacher_decoding is None
    assert not gkd.teacher_logits_suffice  # its teacher reads the student's own text, not the data's


def test_training_rows_are_the_data_unless_the_teacher_decoded_them():
    rows = [{"input_ids": [1, 2], "labels": [2, 7]}, {"input_ids": [3], "labels": [4]}]
    decoded = [{"input_ids": [1, 2], "labels": [2, 5]}, {"input_ids": [3], "labels": [6]}]
    logit = make_objective("logit", {})
    assert logit.training_rows(rows, None) is rows
    assert make_objective("sequence", {}).training_rows(rows, decoded) == decoded
    assert make_objective("sequence", {"keep_references": True}).training_rows(rows, decoded) == rows + decoded
    assert logit.bind(lambda model, rows, device: rows, lambda rows: {}, seed=0) is None  # nothing to bind
    batch = {"input_ids": [[1, 2]]}
    assert logit.prepare_batch(None, batch) is batch  # the data's batch, as given
