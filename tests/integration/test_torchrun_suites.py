"""Whole suites under torchrun: 2 CPU processes (gloo) run each run once, in step, and agree on failures."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from tiny import LM_PAIR, LM_TASK, tiny_suite_data

gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                          reason="torch.distributed with gloo is not available")


# Runs kdbench's CLI (what the `kdbench` console script runs), with test hooks: every training's resulting weights
# are compared across ranks; `nan-rank1` diverges on rank 1 only; `crash_rank1` raises in rank 1's loss only, with
# rank 0 already in the gradient all-reduce; `boom` fails in rank 0's profiling only.
LAUNCHER = textwrap.dedent('''
    import hashlib, json, sys

    from kdbench import distributed
    from kdbench.cli import main
    from kdbench.errors import KdbenchError
    from kdbench.methods import methods
    from kdbench.methods.logit import LogitKD
    from kdbench.run import measure
    from kdbench.train import loop

    class NanOnRank1(LogitKD):
        def loss(self, student_out, teacher_out, labels):
            loss = super().loss(student_out, teacher_out, labels)
            return loss * float("nan") if distributed.rank() == 1 else loss

    methods._entries["nan_rank1"] = NanOnRank1

    class CrashOnRank1(LogitKD):
        def loss(self, student_out, teacher_out, labels):
            if distributed.rank() == 1:
                raise RuntimeError("crash on rank 1")
            return super().loss(student_out, teacher_out, labels)

    methods._entries["crash_rank1"] = CrashOnRank1

    measured = measure.measure_variant

    def measure_variant(name, kind, model, spec, ctx, **kwargs):
        assert distributed.is_main(), "measured on a rank other than 0"
        if spec.method is not None and spec.method.name == "boom":
            raise KdbenchError("boom: profiling failed on rank 0")
        return measured(name, kind, model, spec, ctx, **kwargs)

    measure.measure_variant = measure_variant

    train = loop.train

    def train_and_compare(model, *args, description="training", **kwargs):
        stats = train(model, *args, description=description, **kwargs)
        digest = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        digests = distributed.gather(digest)
        if distributed.is_main():
            with open("trainings.jsonl", "a") as f:  # in the working folder
                f.write(json.dumps({"description": description, "digests": digests, "stats": stats.as_dict()}) + "\\n")
        return stats

    loop.train = train_and_compare
    sys.exit(main())
''')


def write_suite(path: Path, methods_: list[dict], compression: bool = True) -> Path:
    data = tiny_suite_data(path.parent, path.parent / "cache", methods_, name="ddp")
    # one epoch of 64 rows at 16 per process: 2 steps on 2 processes (4 on one)
    data["pairs"][0]["teacher"]["finetune"] = {"epochs": 1, "batch_size": 16}
    if compression:
        data["compression"] = [{"name": "pruned", "recover_steps": 2,
                                "steps": [{"compressor": "prune_unstructured", "params": {"amount": 0.5}}]}]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def torchrun(tmp_path: Path, suite: Path, **env_extra: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 launch.py run suite.yaml` in `tmp_path`."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(launcher), "run", str(suite)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    print(f"torchrun, 2 processes: {time.perf_counter() - t0:.1f} s")
    return done


def results(tmp_path: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (tmp_path / "results" / "ddp" / "runs").glob("*.json")}


KD = {"name": "kd", "method": "logit", "params": {"temperature": 2.0}}
FIT = {"name": "fit", "method": "hidden", "params": {"feature_weight": 0.1}}  # projections: trained inside DDP


@gloo
@pytest.mark.slow
def test_a_suite_under_torchrun_runs_each_run_once_on_two_processes(tmp_path):
    suite = write_suite(tmp_path / "suite.yaml", [KD, FIT])
    done = torchrun(tmp_path, suite)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("runs: 4 ok, 0 failed, 0 already done") == 1  # rank 0 alone prints
    assert "Traceback" not in done.stderr
    out = tmp_path / "results" / "ddp"
    runs = results(tmp_path)
    assert sorted(runs) == ["sentiment__pair__fit__s0", "sentiment__pair__kd__s0", "sentiment__pair__student__s0",
                            "sentiment__pair__teacher"]
    assert not (out / "runs" / "failed").exists() and (out / "README.md").exists()
    assert not list((out / "runs").glob(".*"))  # no temporary file left behind
    for run in runs.values():
        assert run["status"] == "ok", run["error"]
        assert run["distributed"]["world_size"] == 2 and run["distributed"]["backend"] == "gloo"
        training = run["training"]
        assert training["world_size"] == 2
        assert training["samples"] == training["steps"] * 16 * 2  # batch_size is per process
    assert runs["sentiment__pair__teacher"]["training"]["steps"] == 2  # one epoch, shared by the 2 processes
    assert runs["sentiment__pair__kd__s0"]["training"]["steps"] == 2
    pruned = next(v for v in runs["sentiment__pair__kd__s0"]["variants"] if v["name"] == "pruned")
    assert pruned["training"]["samples"] == 2 * 16 * 2 and pruned["latency"]  # recovered by both, profiled by rank 0

    # every training left both ranks with the same weights: DDP averaged every gradient, projections included
    trainings = [json.loads(line) for line in (tmp_path / "trainings.jsonl").read_text().splitlines()]
    assert len(trainings) == 6  # teacher, student, kd, its recovery, fit, its recovery
    for t in trainings:
        assert len(set(t["digests"])) == 1, t["description"]

    # the caches were written once, by rank 0, each folder whole
    cache = tmp_path / "cache"
    [teacher] = (cache / "teachers").iterdir()
    assert (teacher / "config.json").exists()
    [tokenizer] = (cache / "tokenizers").iterdir()
    assert (tokenizer / "tokenizer.json").exists()


@gloo
@pytest.mark.slow
def test_under_torchrun_a_sampled_teacher_is_cached_once_and_trains_both_ranks_alike(tmp_path):
    data = tiny_suite_data(
        tmp_path, tmp_path / "cache", [{"name": "drawn", "method": "logit",
                                        "params": {"temperature": 2.0, "teacher_samples": 4}}], name="ddp",
        tasks=[LM_TASK], pairs=[LM_PAIR], training={"max_steps": 2, "batch_size": 4, "max_seq_length": 32})
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(data, sort_keys=False))
    done = torchrun(tmp_path, suite)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = results(tmp_path)
    assert sorted(runs) == ["lm__llama__drawn__s0", "lm__llama__student__s0", "lm__llama__teacher"]
    assert all(run["status"] == "ok" for run in runs.values()), [run["error"] for run in runs.values()]
    [cached] = (tmp_path / "cache" / "sparse_teacher").iterdir()  # saved once, by rank 0, whole
    assert [p.name for p in cached.iterdir()] == ["teacher_top_k.pt"]
    trainings = [json.loads(line) for line in (tmp_path / "trainings.jsonl").read_text().splitlines()]
    assert len(trainings) == 3  # teacher, student, drawn
    for t in trainings:
        assert len(set(t["digests"])) == 1, t["description"]


@gloo
@pytest.mark.slow
def test_under_torchrun_a_failure_on_one_rank_fails_the_run_on_all_and_the_suite_goes_on(tmp_path):
    """A loss that is NaN on rank 1 alone stops both ranks at the same step; an error in rank 0's profiling reaches
    rank 1 too; neither hangs, and the run after them succeeds, in step."""
    suite = write_suite(tmp_path / "suite.yaml", [{"name": "nan", "method": "nan_rank1"},
                                                  {"name": "boom", "method": "logit"},
                                                  {"name": "after", "method": "logit"}], compression=False)
    done = torchrun(tmp_path, suite)
    assert done.returncode != 0  # exit code 2 on each rank (bad input); torchrun reports the failure
    assert "runs: 3 ok, 2 failed, 0 already done" in done.stdout  # all 5 ran: nan and boom failed
    runs = results(tmp_path)
    nan, boom = runs["sentiment__pair__nan__s0"], runs["sentiment__pair__boom__s0"]
    assert nan["status"] == "failed" and nan["error_kind"] == "input"
    assert nan["error"] == "loss is not finite in another process at step 1; run stopped"  # rank 0's view
    assert boom["status"] == "failed" and boom["error_kind"] == "input"
    assert boom["error"] == "boom: profiling failed on rank 0"
    for ok in ("teacher", "student__s0", "after__s0"):
        assert runs[f"sentiment__pair__{ok}"]["status"] == "ok"
    assert done.stderr.count("error: run sentiment__pair__boom__s0 failed") == 1  # rank 0 reports for all


@gloo
@pytest.mark.slow
def test_under_torchrun_an_error_on_one_rank_mid_training_stops_the_launch_soon(tmp_path):
    """Rank 1 raises in its loss while rank 0 waits in the gradient all-reduce: the two cannot agree on the run.
    Rank 1 gives up after the short agreement timeout (10 s here) instead of the 30-minute collective timeout, and
    its exit stops the launch; the runs finished before stay written."""
    suite = write_suite(tmp_path / "suite.yaml", [{"name": "crash", "method": "crash_rank1"},
                                                  {"name": "after", "method": "logit"}], compression=False)
    t0 = time.perf_counter()
    done = torchrun(tmp_path, suite, KDBENCH_DIST_AGREE_TIMEOUT_S="10")
    assert time.perf_counter() - t0 < 120  # without the bounded agreement: a hang until the subprocess timeout
    assert done.returncode != 0
    assert ("error: run sentiment__pair__crash__s0 failed on rank 1 while the other ranks were still in it "
            "(RuntimeError: crash on rank 1); stopping the launch") in done.stderr
    runs = results(tmp_path)
    assert runs["sentiment__pair__teacher"]["status"] == runs["sentiment__pair__student__s0"]["status"] == "ok"
    assert "sentiment__pair__after__s0" not in runs
