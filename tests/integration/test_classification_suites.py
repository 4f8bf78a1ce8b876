"""Classification suites end to end: the real SST-2 copy cut down, and a method that starts from the student alone."""

from pathlib import Path

import pytest
import torch
import yaml

from kdbench import heads, models
from kdbench.results import read_result, run_path
from kdbench.run.runner import run_suite
from kdbench.suite import load_suite
from tiny import FAST_PROFILING, tiny_suite

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Shared by the tests of this file: the teacher is fine-tuned once and loaded from here afterwards."""
    return tmp_path_factory.mktemp("cache")


def statuses(outcome) -> dict[str, str]:
    return {r.run_id.split("__", 2)[2]: r.status for r in outcome.runs}


KD = {"name": "kd", "method": "logit", "params": {"temperature": 2.0}}


@pytest.mark.slow
def test_sst2_local_suite_cut_down(tmp_path, monkeypatch):
    """suites/sst2-local.yaml with a few hundred rows and a few steps: the table covers every variant and every
    accuracy is a count over the 872 test sentences."""
    if not (SHARED_DATA / "sst2" / "train.tsv").is_file():
        pytest.skip(f"{SHARED_DATA / 'sst2'} is absent")
    suite_file = REPO / "suites" / "sst2-local.yaml"
    data = yaml.safe_load(suite_file.read_text())
    params = data["tasks"][0]["params"]
    for key in ("train_file", "eval_file"):  # relative to the suite file, which the cut-down copy is not beside
        params[key] = str((suite_file.parent / params[key]).resolve())
    params.update(max_train=300, transfer_from_train=200)
    data["pairs"][0]["teacher"]["finetune"] = {"max_steps": 20, "batch_size": 32, "learning_rate": 2e-3}
    data["training"].update(max_steps=20)
    data["compression"] = [c for c in data["compression"] if c["name"] == "int8"]
    data["profiling"] = {**FAST_PROFILING, "batch_sizes": [1, 8]}
    data.update(output_dir=str(tmp_path / "results"), cache_dir=str(tmp_path / "cache"))
    cut = tmp_path / "sst2-cut.yaml"
    cut.write_text(yaml.safe_dump(data))

    outcome = run_suite(load_suite(cut), show_progress=False)
    assert [r.status for r in outcome.runs] == ["ok"] * 3, [r.error for r in outcome.runs]
    readme = (outcome.results_dir / "README.md").read_text()
    assert "## sst2" in readme
    for row in ("| teacher ", "| student alone ", "| logit-kd ", "| logit-kd + int8 "):
        assert row in readme, row
    for record in (read_result(p) for p in (outcome.results_dir / "runs").glob("*.json")):
        for variant in record["variants"]:
            correct = variant["metric"] * 872
            assert abs(correct - round(correct)) < 1e-3, (variant["name"], variant["metric"])


def test_a_method_can_start_from_the_trained_student_alone(tmp_path, cache_dir, monkeypatch):
    """start_from: student distils the student alone of the same seed, as trained: the student run keeps it on
    disk, the method starts from exactly those weights, and its row counts both trainings' steps. A resumed suite
    whose student run is done loads it instead of training it again."""
    from kdbench.train import loop

    sft = {"name": "kd-sft", "method": "logit", "params": {"temperature": 2.0}, "start_from": "student"}
    starts = {}
    train = loop.train

    def spy(model, *a, description="", **kw):
        starts[description] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return train(model, *a, description=description, **kw)

    monkeypatch.setattr(loop, "train", spy)
    suite = tiny_suite(tmp_path, cache_dir, [KD, sft])
    outcome = run_suite(suite, show_progress=False)
    assert statuses(outcome) == {"teacher": "ok", "student__s0": "ok", "kd__s0": "ok", "kd-sft__s0": "ok"}
    [cached] = list((cache_dir / "students").iterdir())
    alone = models.load_saved(cached, heads.get("classification"))
    start = starts["kd-sft, seed 0"]
    assert all(torch.equal(start[k], v) for k, v in alone.state_dict().items())
    assert not all(torch.equal(start[k], v) for k, v in starts["kd, seed 0"].items())  # kd starts from init
    out = outcome.results_dir
    steps = {m: read_result(run_path(out, f"sentiment__pair__{m}__s0"))["training"]["steps"]
             for m in ("student", "kd", "kd-sft")}
    assert steps["kd-sft"] == steps["student"] + steps["kd"]

    run_path(out, "sentiment__pair__kd-sft__s0").unlink()  # resumed: only kd-sft runs again
    starts.clear()
    outcome = run_suite(suite, show_progress=False)
    assert statuses(outcome)["kd-sft__s0"] == "ok" and list(starts) == ["kd-sft, seed 0"]
    assert all(torch.equal(starts["kd-sft, seed 0"][k], v) for k, v in alone.state_dict().items())
