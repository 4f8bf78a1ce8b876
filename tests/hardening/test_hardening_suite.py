"""Suite values that must be refused at load time (issue 14, "Settings that should be refused" and "Writing in the
wrong place"): each is one KdbenchError naming the key and its line, and `kdbench validate` exits 2 with it.
"""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.errors import KdbenchError
from kdbench.suite import load_suite

SMOKE = Path(__file__).resolve().parents[2] / "suites" / "smoke.yaml"


def smoke_text() -> str:
    return SMOKE.read_text()


def line_of(text: str, fragment: str) -> int:
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if fragment in line]
    assert len(hits) == 1, (fragment, hits)
    return hits[0]


def refused(tmp_path: Path, text: str, *fragments: str) -> str:
    """The API's one-line error holds every fragment; `kdbench validate` prints it alone and exits 2."""
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    with pytest.raises(KdbenchError) as info:
        load_suite(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}:"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [f"error: {message}"]
    assert "Traceback" not in result.output
    return message


def with_training(**changes) -> str:
    data = yaml.safe_load(smoke_text())
    data["training"].update(changes)
    return yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------
# Duplicate keys


def test_duplicate_top_level_key_is_refused_with_both_lines(tmp_path):
    text = smoke_text().replace("seeds: [0]\n", "seeds: [0]\nseeds: [1, 2]\n")
    refused(tmp_path, text, "invalid YAML: duplicate key 'seeds'",
            f"line {line_of(text, 'seeds: [1, 2]')}:", f"first given on line {line_of(text, 'seeds: [0]')}")


def test_duplicate_key_inside_a_flow_mapping_is_refused(tmp_path):
    text = smoke_text().replace("params: {temperature: 2.0, alpha: 0.5}",
                                "params: {temperature: 2.0, temperature: 4.0}")
    refused(tmp_path, text, "duplicate key 'temperature'", f"line {line_of(text, 'temperature: 4.0')}:")


def test_a_merge_key_may_be_overridden(tmp_path):
    """`<<: *base` then the same key: YAML's own override, not a duplicate."""
    text = smoke_text().replace(
        "training: {epochs: 2, batch_size: 32, learning_rate: 2.0e-3, max_seq_length: 32}",
        "training:\n  <<: {epochs: 5, batch_size: 32}\n  epochs: 2\n  max_seq_length: 32")
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    assert load_suite(path).training.epochs == 2


def test_safe_load_semantics_stay_python_tags_refused(tmp_path):
    text = smoke_text().replace("name: smoke", "name: !!python/object/apply:os.system ['true']")
    refused(tmp_path, text, "invalid YAML", f"line {line_of(text, 'python/object')}")


def test_a_scalar_its_tag_cannot_build_is_a_yaml_error_at_its_line(tmp_path):
    text = smoke_text().replace("seeds: [0]", "seeds: [!!int zero]")
    refused(tmp_path, text, "invalid YAML: cannot read int value", f"line {line_of(text, 'zero')}")


def test_a_cyclic_alias_is_refused(tmp_path):
    text = smoke_text().replace("seeds: [0]", "seeds: &s [0, *s]")
    refused(tmp_path, text, "seeds[1]: an alias refers to itself")


def test_a_billion_laughs_document_is_refused_quickly(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    refused(tmp_path, smoke_text() + "\n".join(lines) + "\n", "values once its aliases are expanded")


def test_a_suite_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_bytes(b"name: caf\xe9\n")  # \xe9 is byte 9 (from 0)
    with pytest.raises(KdbenchError) as info:
        load_suite(path)
    assert str(info.value) == f"{path}: not UTF-8 text (invalid continuation byte at byte 9)"


# ---------------------------------------------------------------------------------------------------------------
# Numbers: finite, in range, with a bound that says how to go past it


@pytest.mark.parametrize("epochs", [0, -1])
def test_epochs_must_be_positive(tmp_path, epochs):
    text = with_training(epochs=epochs)
    refused(tmp_path, text, "training.epochs: Input should be greater than 0",
            f"line {line_of(text, f'  epochs: {epochs}')}:")


def test_epochs_without_end_are_refused_and_the_error_says_how_to_go_past(tmp_path, monkeypatch):
    text = with_training(epochs="1e9")  # a string in YAML 1.1, which pydantic reads as a float
    refused(tmp_path, text, "training.epochs: 1,000,000,000 epochs is more than the limit of 1,000",
            "set max_steps", "KDBENCH_MAX_EPOCHS=N")
    monkeypatch.setenv("KDBENCH_MAX_EPOCHS", "2e9")
    path = tmp_path / "raised.yaml"
    path.write_text(text)
    assert load_suite(path).training.epochs == 1e9


@pytest.mark.parametrize("steps, message", [
    (0, "training.max_steps: must be > 0 (or -1: train for `epochs`), got 0"),
    (-5, "training.max_steps: must be > 0 (or -1: train for `epochs`), got -5"),
    (10**9, "training.max_steps: 1,000,000,000 steps is more than the limit of 1,000,000; raise it with "
            "KDBENCH_MAX_STEPS=N"),
])
def test_steps_must_be_positive_and_bounded(tmp_path, steps, message):
    refused(tmp_path, with_training(max_steps=steps), message)


def test_a_teachers_finetune_and_a_methods_training_are_bounded_too(tmp_path):
    data = yaml.safe_load(smoke_text())
    data["pairs"][0]["teacher"]["finetune"]["epochs"] = 0
    refused(tmp_path, yaml.safe_dump(data, sort_keys=False), "pairs[0].teacher.finetune.epochs")
    data = yaml.safe_load(smoke_text())
    data["methods"][0]["training"] = {"max_steps": 0}
    refused(tmp_path, yaml.safe_dump(data, sort_keys=False), "methods[0].training.max_steps: must be > 0")


@pytest.mark.parametrize("old, new, key", [
    ("params: {temperature: 2.0, alpha: 0.5}", "params: {temperature: .inf, alpha: 0.5}",
     "methods[0].params.temperature"),
    ("params: {temperature: 2.0, alpha: 0.5}", "params: {temperature: .nan, alpha: 0.5}",
     "methods[0].params.temperature"),
    ("learning_rate: 2.0e-3, max_seq_length", "learning_rate: .inf, max_seq_length", "training.learning_rate"),
    ("time_budget_s: 0.05", "time_budget_s: .inf", "profiling.time_budget_s"),
])
def test_non_finite_numbers_are_refused_at_their_line(tmp_path, old, new, key):
    text = smoke_text().replace(old, new)
    assert text != smoke_text()
    refused(tmp_path, text, f"{key}: must be a finite number", f"line {line_of(text, new)}:")


def test_a_non_finite_number_written_as_text_is_refused_too(tmp_path):
    """YAML reads `inf` (no dot) as a string; a params schema's float field would turn it into infinity."""
    text = smoke_text().replace("params: {temperature: 2.0, alpha: 0.5}", "params: {temperature: inf, alpha: 0.5}")
    refused(tmp_path, text, "methods[0].params.temperature: ", "finite number", f"line {line_of(text, 'temperature: inf')}")
    text = with_training(learning_rate="inf")
    refused(tmp_path, text, "training.learning_rate")


# ---------------------------------------------------------------------------------------------------------------
# Names become folder and file names


@pytest.mark.parametrize("name", [".", ".."])
def test_a_suite_name_that_is_not_a_folder_name_is_refused(tmp_path, name):
    text = smoke_text().replace("name: smoke", f"name: '{name}'")
    refused(tmp_path, text, f"line {line_of(text, f'name: {name!r}')}: name: {name!r} is not a valid name: it "
                            "would write outside the results folder")


@pytest.mark.parametrize("old, new, key", [
    ("  - name: sentiment", "  - name: ../../elsewhere", "tasks[0].name"),
    ("  - name: bert-1L32-to-1L16", "  - name: a/b", "pairs[0].name"),
    ("  - name: logit-kd", "  - name: '..'", "methods[0].name"),
])
def test_names_in_run_ids_stay_inside_runs(tmp_path, old, new, key):
    text = smoke_text().replace(old, new)
    refused(tmp_path, text, f"{key}: ", "is not a valid name", f"line {line_of(text, new.strip())}")


def test_a_run_id_that_steps_out_of_runs_is_refused_when_written(tmp_path):
    from kdbench.results import run_path

    with pytest.raises(KdbenchError, match="cannot be a file name"):
        run_path(tmp_path, "../README")
    assert run_path(tmp_path, "a__b__c") == tmp_path / "runs" / "a__b__c.json"


# ---------------------------------------------------------------------------------------------------------------
# Method params: the loss's own rules, checked at load


@pytest.mark.parametrize("beta", [0, 1, 0.0, 1.0])
def test_jsd_with_beta_at_either_end_is_refused_at_load(tmp_path, beta):
    new = f"params: {{temperature: 2.0, alpha: 0.5, divergence: jsd, beta: {beta}}}"
    text = smoke_text().replace("params: {temperature: 2.0, alpha: 0.5}", new)
    refused(tmp_path, text, f"line {line_of(text, 'divergence: jsd')}: methods[0].params: method 'logit': params: "
                            f"beta must lie in (0, 1) for divergence 'jsd', got {beta:g}")


def test_beta_inside_or_unused_loads(tmp_path):
    for params in ("{divergence: jsd, beta: 0.1}", "{divergence: forward_kl, beta: 0}"):
        path = tmp_path / "ok.yaml"
        path.write_text(smoke_text().replace("params: {temperature: 2.0, alpha: 0.5}", f"params: {params}"))
        assert load_suite(path).methods[0].params["divergence"] in ("jsd", "forward_kl")


def test_the_loss_refuses_what_validation_refuses():
    """The same rule on both sides: kd_loss refuses beta 0 and 1 for jsd, and takes 0.1."""
    import torch

    from kdbench.kernels import KdLossInputError, kd_loss
    from kdbench.methods.base import SoftTargets

    s, t = torch.randn(3, 7), torch.randn(3, 7)
    for beta in (0.0, 1.0):
        with pytest.raises(KdLossInputError, match="beta must lie in"):
            kd_loss(s, t, divergence="jsd", beta=beta)
        with pytest.raises(ValueError, match="beta must lie in"):
            SoftTargets(divergence="jsd", beta=beta)
    assert torch.isfinite(kd_loss(s, t, divergence="jsd", beta=0.1))
    assert SoftTargets(divergence="jsd", beta=0.1).beta == 0.1


def test_a_params_schema_that_allows_infinity_still_gets_finite_values(tmp_path, monkeypatch):
    """A registered entry whose schema has an unbounded float (pydantic's default allows inf): the loader's own
    check refuses the string "inf" that the schema turned into infinity."""
    from pydantic import BaseModel

    from kdbench.compress import compressors

    class Loose:
        class Params(BaseModel):
            weight: float = 1.0

    monkeypatch.setitem(compressors._entries, "loose", Loose)
    text = smoke_text().replace("steps: [{compressor: int8}]", "steps: [{compressor: loose, params: {weight: inf}}]")
    refused(tmp_path, text, "compression[1].steps[0].params.weight: must be a finite number, got inf",
            f"line {line_of(text, 'weight: inf')}")
