"""Data parallel (kdbench.distributed): the rank helpers alone, and two gloo processes joined by setup().

Whole suites under torchrun: tests/integration/test_torchrun_suites.py; every method under DDP:
tests/train/test_ddp_training.py."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdbench import distributed
from kdbench.errors import KdbenchError

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
