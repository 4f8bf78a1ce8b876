"""Data-parallel suites: the rank helpers alone, two gloo processes, and a whole suite under torchrun."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdbench import distributed
from kdbench.errors import KdbenchError
from tiny import LM_PAIR, LM_TASK, tiny_suite_data

gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                          reason="torch.distributed with gloo is not available")


# ---------------------------------------------------------------------------------------------------------------
# One process: every helper runs here, as if there were no launcher


@pytest.fixture
def single(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_outside_torchrun_the_helpers_run_in_this_process(single):
    assert not distributed.launched() and not distributed.active()
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank(), distributed.is_main()) == (
        1, 0, 0, True)
    assert distributed.setup("cpu") == "cpu" and distributed.setup("cuda") == "cuda"  # no process group, no index
    assert distributed.broadcast(3) == 3 and distributed.gather("x") == ["x"]
    distributed.barrier()
    assert distributed.describe() is None
    assert distributed.on_main(lambda: {"metric": 0.5}) == {"metric": 0.5}
    with pytest.raises(KdbenchError, match="bad input"):
        distributed.on_main(lambda: (_ for _ in ()).throw(KdbenchError("bad input")))
    distributed.teardown()  # nothing to leave


def test_a_launch_of_one_process_is_no_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not distributed.launched() and distributed.world_size() == 1 and distributed.is_main()


def test_ranks_come_from_the_launchers_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched() and (distributed.world_size(), distributed.rank(), distributed.local_rank()) == (
        4, 3, 1)
    assert not distributed.is_main()
    assert not distributed.active()  # launched, but not joined: setup() joins


def test_the_single_process_path_imports_no_torch():
    """`kdbench --help` stays instant: the helpers read the environment, and touch torch only under torchrun."""
    code = ("import sys, kdbench.distributed as d; d.setup('cpu'); d.on_main(lambda: 1); d.barrier(); "
            "print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------------------
# Two processes joined by setup() (gloo), without torchrun: the helpers' contracts across ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _helpers_on_two_ranks(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    seen = {}
    assert distributed.setup("cpu") == "cpu" and distributed.active()
    seen["describe"] = distributed.describe()
    seen["broadcast"] = distributed.broadcast(f"from rank {rank}")
    seen["gather"] = distributed.gather(rank * 10)
    seen["on_main"] = distributed.on_main(lambda: {"ran on": distributed.rank()})
    # chunks of 2 shared out: [0, 1] and [4, 5] on rank 0, [2, 3] and [6] on rank 1; the whole result on both
    seen["map_sharded"] = distributed.map_sharded(lambda xs: [x * 10 + distributed.rank() for x in xs],
                                                  list(range(7)), chunk=2)
    try:  # rank 0's error reaches every rank, with its class
        distributed.on_main(lambda: (_ for _ in ()).throw(KdbenchError("profiling failed")))
    except KdbenchError as e:
        seen["error"] = f"{type(e).__name__}: {e}"
    try:  # a collective inside rank-0-only work would hang; it fails on both ranks instead
        distributed.on_main(lambda: distributed.broadcast(1))
    except RuntimeError as e:
        seen["nested"] = str(e)
    distributed.barrier()
    seen["after"] = distributed.on_main(lambda: "in step")  # still in lockstep after the failures
    distributed.teardown()
    seen["active after teardown"] = distributed.active()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))


@gloo
def test_two_ranks_agree_on_values_and_errors(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_helpers_on_two_ranks, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert r0["describe"]["world_size"] == 2 and r0["describe"]["backend"] == "gloo"
    assert r0["broadcast"] == r1["broadcast"] == "from rank 0"
    assert r0["gather"] == r1["gather"] == [0, 10]
    assert r0["on_main"] == r1["on_main"] == {"ran on": 0}
    assert r0["map_sharded"] == r1["map_sharded"] == [0, 10, 21, 31, 40, 50, 61]
    assert r0["error"] == r1["error"] == "KdbenchError: profiling failed"
    assert "inside on_main" in r0["nested"] and r0["nested"] == r1["nested"]
    assert r0["after"] == r1["after"] == "in step"
    assert not r0["active after teardown"] and not r1["active after teardown"]


# ---------------------------------------------------------------------------------------------------------------
# A whole suite under torchrun: 2 CPU processes (gloo)

# Runs kdbench's CLI (what the `kdbench` console script runs), with test hooks: every training's resulting weights
# are compared across ranks; `nan-rank1` diverges on rank 1 only; `crash_rank1` raises in rank 1's loss only, with
# rank 0 already in the gradient all-reduce; `boom` fails in rank 0's profiling only.
LAUNCHER = textwrap.dedent('''
    import hashlib, json, sys

    from kdbench import distributed, runner, trainer
    from kdbench.cli import main
    from kdbench.errors import KdbenchError
    from kdbench.methods import LogitKD, methods

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

    measure = runner.measure_variant

    def measure_variant(name, kind, model, spec, ctx, **kwargs):
        assert distributed.is_main(), "measured on a rank other than 0"
        if spec.method is not None and spec.method.name == "boom":
            raise KdbenchError("boom: profiling failed on rank 0")
        return measure(name, kind, model, spec, ctx, **kwargs)

    runner.measure_variant = measure_variant

    train = trainer.train

    def train_and_compare(model, *args, description="training", **kwargs):
        stats = train(model, *args, description=description, **kwargs)
        digest = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        digests = distributed.gather(digest)
        if distributed.is_main():
            with open("trainings.jsonl", "a") as f:  # in the working folder
                f.write(json.dumps({"description": description, "digests": digests, "stats": stats.as_dict()}) + "\\n")
        return stats

    trainer.train = train_and_compare
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
    assert done.stdout.count("4 run(s) executed, 0 already done") == 1  # rank 0 alone prints
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
    assert "5 run(s) executed, 0 already done" in done.stdout
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


# Every objective's trainable parameters under DDP: the student's, a feature method's projections (used after the
# student's forward), a staged method's frozen layers, a multi-task student's task models (called one by one).
TRAINERS = textwrap.dedent('''
    import hashlib, json, sys
    import torch
    from transformers import default_data_collator
    from kdbench import distributed, heads, models, multitask, trainer
    from kdbench.methods import make_objective
    from kdbench.suite import InlineConfig, TrainingSettings

    def digest(model):
        return hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()

    device = distributed.setup("cpu")
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, 100, (12,), generator=g).tolist(), "attention_mask": [1] * 12,
             "token_type_ids": [0] * 12, "labels": i % 2} for i in range(64)]
    bert = dict(model_type="bert", num_attention_heads=2, max_position_embeddings=32)
    teacher_ref = InlineConfig(**bert, num_hidden_layers=2, hidden_size=16, intermediate_size=32)
    student_ref = InlineConfig(**bert, num_hidden_layers=1, hidden_size=8, intermediate_size=16)
    head = heads.get("classification")
    teacher = models.build_model(teacher_ref, head=head, num_labels=2, vocab_size=100, seed=0)
    settings = TrainingSettings(max_steps=3, batch_size=4)
    out = {}
    for method in ("logit", "hidden", "attention", "progressive", "multitask"):
        if method == "multitask":
            students = multitask.build_students(student_ref, [("a", 2), ("b", 2)], head=head, vocab_size=100, seed=1)
            parts = [(students[n], teacher, make_objective("logit", {}), head) for n in ("a", "b")]
            model = multitask.MultiTaskStudent(students)
            initial = digest(model)
            stats = trainer.train(model, [{**r, "task": i % 2} for i, r in enumerate(rows)], default_data_collator,
                                  settings, seed=0, device=device, head=head, distiller=multitask.MultiTaskDistiller,
                                  parts=parts)
        else:
            model = models.build_model(student_ref, head=head, num_labels=2, vocab_size=100, seed=1)
            initial = digest(model)
            stats = trainer.train(model, rows, default_data_collator, settings, seed=0, device=device,
                                  teacher=teacher, objective=make_objective(method, {}), head=head)
        out[method] = {"digests": distributed.gather(digest(model)), "trained": digest(model) != initial,
                       "stats": stats.as_dict()}
    if distributed.is_main():
        print(json.dumps(out))
    distributed.teardown()
''')


@gloo
@pytest.mark.slow
def test_under_ddp_every_method_keeps_the_ranks_weights_equal(tmp_path):
    script = tmp_path / "trainers.py"
    script.write_text(TRAINERS)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"},
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert sorted(out) == ["attention", "hidden", "logit", "multitask", "progressive"]
    for method, r in out.items():
        assert len(set(r["digests"])) == 1, f"{method}: the two ranks ended with different weights"
        assert r["trained"], method
        assert r["stats"] == {**r["stats"], "steps": 3, "samples": 3 * 4 * 2, "world_size": 2}
