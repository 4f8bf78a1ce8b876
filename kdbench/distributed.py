"""Data-parallel suites: which process this is, and keeping the processes of a torchrun launch in step.

`torchrun --nproc_per_node N $(which kdbench) run suite.yaml` starts N processes (ranks). transformers.Trainer
trains with DDP across them; everything around training follows three rules, which the helpers here implement:

- every rank takes the same decisions (which runs are pending, whether a teacher is cached): rank 0 takes them and
  `broadcast`s them;
- what touches the disk or measures (result JSONs, the report, the tokenizer/teacher/multi-task caches, evaluation,
  latency, memory, energy) happens on rank 0 only: `on_main(fn)` runs `fn` there and hands its return value, or its
  exception, to every rank, so all ranks leave a failed step the same way and none waits for a collective that the
  others skipped;
- what every rank needs is built by every rank, identically (the tokenizer is trained deterministically, the
  teacher fine-tuned by all ranks together; a frozen teacher's logits and decoded targets are computed a share
  per rank and exchanged, `map_sharded`); rank 0 alone saves it, through a rename (models.save_atomically), so
  that a rank that finds it on disk loads a whole copy.

These messages go over a gloo group of their own (`control`), with a long timeout (KDBENCH_DIST_TIMEOUT_S,
default 3 hours), because the other ranks wait there while rank 0 profiles; the Trainer's gradients go over the
default group (gloo on the CPU, NCCL on CUDA, each rank on its own GPU: LOCAL_RANK).

The ranks compare each run's outcome over a third gloo group with a short timeout (`gather(..., bounded=True)`,
KDBENCH_DIST_AGREE_TIMEOUT_S, default 300 s): they reach that point together, unless a run failed on some ranks
while the others are still inside a training collective, where they would wait for the default group's 30-minute
timeout. Then the failed ranks give up after the short one (RanksOutOfStepError), and their exit makes torchrun
stop the launch.

Outside torchrun (WORLD_SIZE unset or 1) every helper is a no-op that runs in this process, and torch.distributed
is not even imported.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")

TIMEOUT_ENV = "KDBENCH_DIST_TIMEOUT_S"
CONTROL_TIMEOUT_S = 3 * 3600  # rank 0 may profile for a long time while the others wait
TRAINING_TIMEOUT_S = 1800  # the Trainer's own default (TrainingArguments.ddp_timeout)
AGREE_TIMEOUT_ENV = "KDBENCH_DIST_AGREE_TIMEOUT_S"
AGREE_TIMEOUT_S = 300  # ranks that are in step reach the end of a run within seconds of each other

_state: dict[str, Any] = {"control": None, "agree": None, "owned": False, "backend": None, "solo": False}


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if launched() else 0


def local_rank() -> int:
    """The rank on this machine: which GPU this process uses."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def is_main() -> bool:
    """Rank 0, the process that writes and measures (always True outside torchrun)."""
    return rank() == 0


def active() -> bool:
    """Several processes, joined in a process group by `setup`."""
    return launched() and _state["control"] is not None


def setup(device: str) -> str:
    """Join the launch's process group (once) and return this process's device: `device` itself outside torchrun;
    `cuda:<LOCAL_RANK>` on CUDA (set as the current device too, so nothing lands on cuda:0 by default)."""
    if not launched():
        return device
    import torch
    import torch.distributed as dist

    from kdbench.errors import KdbenchError

    if not dist.is_available():
        raise KdbenchError(f"launched with WORLD_SIZE={world_size()}, but this torch has no torch.distributed")
    cuda = device.startswith("cuda")
    if cuda:
        if local_rank() >= torch.cuda.device_count():
            raise KdbenchError(f"LOCAL_RANK {local_rank()} has no GPU: {torch.cuda.device_count()} visible "
                               "(use --nproc_per_node at most the GPU count)")
        torch.cuda.set_device(local_rank())
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if not cuda and not dist.is_gloo_available():
            raise KdbenchError("data-parallel runs on the CPU need torch.distributed's gloo backend")
        extra = {"device_id": torch.device("cuda", local_rank())} if cuda else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=TRAINING_TIMEOUT_S), **extra)
        _state["owned"] = True
    _state["backend"] = dist.get_backend()
    if _state["control"] is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, CONTROL_TIMEOUT_S))
        _state["control"] = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        agree_s = float(os.environ.get(AGREE_TIMEOUT_ENV, AGREE_TIMEOUT_S))
        _state["agree"] = dist.new_group(backend="gloo", timeout=timedelta(seconds=agree_s))
    return f"cuda:{local_rank()}" if cuda else device


def teardown() -> None:
    """Leave the process group if `setup` created it (a process that brought its own keeps it)."""
    if _state["control"] is None:
        return
    import torch.distributed as dist

    if _state["owned"] and dist.is_initialized():
        dist.destroy_process_group()  # the control group goes with it
    elif dist.is_initialized():
        dist.destroy_process_group(_state["control"])
        dist.destroy_process_group(_state["agree"])
    _state.update(control=None, agree=None, owned=False, backend=None)


def scope_key() -> list[str]:
    """What a trained model depends on beyond its spec under data parallel: the process count (a step takes
    batch_size rows from each process). Empty for one process, so single-process cache keys stay as they were."""
    return [] if world_size() == 1 else [f"world_size={world_size()}"]


def describe() -> dict | None:
    """What a result records about the launch: None for a single process."""
    if not active():
        return None
    return {"world_size": world_size(), "backend": _state["backend"], "measured_on_rank": 0,
            "note": "trained with DDP on every rank; written, evaluated and profiled on rank 0 only"}


def _collective(name: str) -> None:
    if _state["solo"]:
        raise RuntimeError(f"kdbench bug: distributed.{name} called inside on_main's rank-0-only work, where the "
                           "other ranks cannot answer it")


def barrier() -> None:
    if active():
        import torch.distributed as dist

        _collective("barrier")
        dist.barrier(group=_state["control"])


def broadcast(value: T) -> T:
    """Rank 0's `value` on every rank (picklable; other ranks' `value` is ignored)."""
    if not active():
        return value
    import torch.distributed as dist

    _collective("broadcast")
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=_state["control"])
    return box[0]


def gather(value: T, *, bounded: bool = False) -> list[T]:
    """Every rank's `value`, in rank order, on every rank.

    bounded: over the short-timeout group; a rank that is not there in time (it is stuck in another collective)
    makes this raise RanksOutOfStepError instead of waiting."""
    if not active():
        return [value]
    import torch.distributed as dist

    from kdbench.errors import RanksOutOfStepError

    _collective("gather")
    out: list = [None] * world_size()
    if not bounded:
        dist.all_gather_object(out, value, group=_state["control"])
        return out
    try:
        dist.all_gather_object(out, value, group=_state["agree"])
    except RuntimeError as e:  # gloo's timeout, or a peer that has exited
        raise RanksOutOfStepError(f"rank {rank()} waited in vain for the other ranks ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else 'no message'})") from e
    return out


def map_sharded(fn: Callable[[list], list], items: list, chunk: int) -> list:
    """fn over `items`, one chunk of `chunk` items at a time, with the chunks shared out among the ranks (rank r
    takes chunks r, r + N, ...); every rank returns the whole result, in order. The chunks are those a single
    process would use, so the result is the same as one process's (batch padding included). Outside torchrun,
    fn per chunk here. For a frozen teacher's work before training: its logits, or sequence-level KD's decoding."""
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    if not active():
        return [x for part in chunks for x in fn(part)]
    mine = {k: fn(chunks[k]) for k in range(rank(), len(chunks), world_size())}
    done: dict = {}
    for part in gather(mine):
        done.update(part)
    return [x for k in range(len(chunks)) for x in done[k]]


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def on_main(fn: Callable[[], T]) -> T:
    """Rank 0 runs `fn`; every rank returns its value (it must pickle: keep it small, e.g. a measurements dict),
    or raises its exception. The other ranks wait meanwhile, so this is a barrier too.

    `fn` must not itself call a collective (these helpers, training): the other ranks are not there to answer.
    The helpers refuse it (an error on every rank instead of a hang); so build what every rank needs (a tokenizer,
    a teacher) before, not lazily inside `fn`."""
    if not active():
        return fn()
    _collective("on_main")
    if is_main():
        _state["solo"] = True
        try:
            value = fn()
        except Exception as e:
            _state["solo"] = False
            broadcast(("error", _portable(e)))
            raise
        finally:
            _state["solo"] = False
        broadcast(("ok", value))
        return value
    kind, value = broadcast(None)
    if kind == "error":
        raise value
    return value
