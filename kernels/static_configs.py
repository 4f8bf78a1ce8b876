"""The kernel configurations the static cost model compiles (kernels/static_model.py), and how it finds them.

A configuration is an `Entry`: a name and a call that runs a kernel's own launcher on (N, V) logits. Each kernel
it launches needs the facts of its design that SASS cannot tell (`Facts`: elements per program, HBM bytes per
element, the hot loops' tile): its function in KERNEL_FACTS, by the kernel's name. The launcher runs on meta
tensors that claim to be on CUDA, with Triton's launch intercepted, so what is compiled is exactly what it would
launch on a GPU: every config of an autotuner, and for a launcher that sizes its grid from the compiled kernel,
that kernel's sm_90 build. Adding a kernel: a facts function in KERNEL_FACTS and one `register(Entry(...))`. The
capture and the compiles run in a child process without TRITON_INTERPRET (`python -m ...static_configs --worker`).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from unittest import mock

from kdbench.kernels import sass

SHAPES = [(8192, 128256, "bfloat16"), (65536, 1000, "float32")]
TEMPERATURE, ALPHA = 2.0, 0.5  # the loss of the measured table: forward KL + CE, every row valid, with gradient
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}




@dataclass(frozen=True)
class Facts:
    """What the SASS cannot tell, from the kernel's design, for one launch on one shape."""

    elements: float  # logits (row elements) one program processes (an average for a persistent grid)
    bytes_per_element: float  # HBM bytes per logit by design: (reads + writes of N x V tensors) x dtype size
    tile: int = 0  # elements per program in one source-level iteration of each hot loop (BLOCK_V, a row, a chunk)
    loop_bytes: tuple[float, ...] = ()  # per hot loop, in address order: the global bytes per element it moves;
    #                                     with the loop's LDG/STG bytes it gives the unroll factor
    hot: str = "innermost"  # which loops on the path carry the elements: 'innermost' or 'outermost'
    trips: float | None = None  # iterations of each hot loop per program; default ceil(elements / (tile x unroll))
    design: str = ""


@dataclass(frozen=True)
class Entry:
    name: str
    call: Callable  # (s, t, labels) -> runs the kernel's launcher on (N, V) logits
    facts: Callable  # (kernel name, launch kwargs, (N, V, dtype), programs) -> Facts, or None: not modelled
    measured: str | None = None  # its implementation's name in the measured table
    env: dict | None = None  # environment variables set while it is called (a kernel selector)
    shapes: tuple | None = None  # the shapes it runs on (default: all of SHAPES)


ENTRIES: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    if entry.name in ENTRIES:
        raise ValueError(f"static model entry {entry.name!r} registered twice")
    ENTRIES[entry.name] = entry
    return entry


def _kd_loss(s, t, labels):
    from kdbench.kernels import kd_loss

    return kd_loss(s, t, labels, temperature=TEMPERATURE, alpha=ALPHA)


def _kd_loss_facts(kernel: str, kw: dict, shape: tuple, programs: int) -> Facts | None:
    """The production kernel: one row per program; a row that fits in one tile sits in registers and is read once
    (3 N V), a longer one takes two passes over tiles, statistics then gradient (2 reads, then 2 reads + 1 write)."""
    _, v, dtype = shape
    b, tile = ITEMSIZE[dtype], kw["BLOCK_V"]
    if tile >= v:
        return Facts(v, 3 * b, tile, (), design="whole row in registers, read once")
    return Facts(v, 5 * b, tile, (2 * b, 3 * b), design="two passes over tiles")


# The new kernels, through their own launchers (opt-in, untimed; kernels/TUNING.md).
_OPTS = dict(temperature=TEMPERATURE, alpha=ALPHA, divergence="forward_kl", beta=0.5, ignore_index=-100,
             reduction="batchmean", feature_weight=0.0)


def _launcher(module: str):
    def call(s, t, labels):
        import importlib

        return importlib.import_module(module).kd_loss_forward(s, t, labels, _OPTS, True)

    return call


def _split_facts(kernel: str, kw: dict, shape: tuple, programs: int) -> Facts:
    """A persistent grid walks (row, chunk) tickets, CHUNK logits each in registers. The single launch (PHASE 0)
    reads s and t and writes the gradient once; the multi-launch mode reads them again in its last launch."""
    n, v, dtype = shape
    b, chunk = ITEMSIZE[dtype], kw["CHUNK"]
    tickets = n * math.ceil(v / chunk)
    moved = {0: 3, 1: 2, 2: 2, 3: 3}[kw["PHASE"]] * b
    return Facts(n * v / programs, moved, chunk, (moved,), "outermost", tickets / programs,
                 f"split rows, chunk {chunk}, phase {kw['PHASE']}")


def _persistent_facts(kernel: str, kw: dict, shape: tuple, programs: int) -> Facts:
    """A persistent grid walks the rows, one whole row in registers per iteration, read once."""
    n, v, dtype = shape
    return Facts(n * v / programs, 3 * ITEMSIZE[dtype], v, (3 * ITEMSIZE[dtype],), "innermost", n / programs,
                 "persistent, a row per iteration")


# Each kernel's facts, by its @triton.jit function's name: whichever kernel a launcher picks gets its own.
KERNEL_FACTS = {"_kd_loss_fwd_kernel": _kd_loss_facts, "_kd_loss_split_kernel": _split_facts,
                "_kd_loss_persistent_kernel": _persistent_facts}
NOT_MODELLED = {"_scale_rows_kernel"}  # grad_output scaling: not launched at grad_output == 1


def facts_for(kernel: str, kw: dict, shape: tuple, programs: int) -> Facts | None:
    if kernel in NOT_MODELLED:
        return None
    if kernel not in KERNEL_FACTS:
        raise KeyError(f"no design facts for kernel {kernel} (add them to KERNEL_FACTS)")
    return KERNEL_FACTS[kernel](kernel, kw, shape, programs)


register(Entry("kd_loss (triton)", _kd_loss, facts_for, measured="kd_loss (triton)", env={"KDBENCH_KERNEL": "triton"}))
register(Entry("kd_loss split (new)", _launcher("kdbench.kernels.kd_loss_split"), facts_for, shapes=(SHAPES[0],)))
register(Entry("kd_loss persistent (new)", _launcher("kdbench.kernels.kd_loss_persistent"), facts_for,
               shapes=(SHAPES[1],)))


# ----------------------------------------------------------------------------------------------------------------
# Launches, as a GPU would get them (runs in a process without TRITON_INTERPRET)
# ----------------------------------------------------------------------------------------------------------------


def _capture(entry: Entry, shape: tuple) -> list[dict]:
    """Every Triton launch of entry.call on (N, V) logits: fn, args, kwargs, programs, and 'config' (i, n) for
    each config of an autotuner. Nothing runs: the tensors are meta tensors whose is_cuda is True."""
    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from kdbench.kernels.static_model import CARD  # (static_model imports this module)

    class OnGpu(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    launches, config = [], [None]

    def jit_run(fn, *args, grid, warmup, **kwargs):
        if warmup:  # a launcher that sizes its grid from the compiled kernel gets this one's, for sm_90
            c = sass.compile_sm90(fn, args, kwargs)
            return SimpleNamespace(n_regs=c.regs, n_spills=c.local // 4, _init_handles=lambda: None,
                                   metadata=SimpleNamespace(shared=c.shared, num_warps=c.num_warps, name=c.name))
        if callable(grid):
            grid = grid({**dict(zip(fn.arg_names, args)), **kwargs})
        launches.append(dict(fn=fn, args=args, kwargs=kwargs, programs=math.prod(grid), config=config[0]))

    def tune_run(tuner, *args, **kwargs):
        for i, c in enumerate(tuner.configs):
            config[0] = (i + 1, len(tuner.configs))
            tuner.fn.run(*args, **{**kwargs, **c.all_kwargs()})
        config[0] = None

    n, v, dtype = shape

    def meta(*size, dt):
        return torch.empty(*size, dtype=dt, device="meta").as_subclass(OnGpu)

    dt = getattr(torch, dtype)
    props = SimpleNamespace(multi_processor_count=CARD.sms, major=9, minor=0, name="sm_90 (static model)")
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(JITFunction, "run", jit_run))
        stack.enter_context(mock.patch.object(Autotuner, "run", tune_run))
        stack.enter_context(mock.patch("torch.cuda.get_device_properties", return_value=props))
        stack.enter_context(mock.patch.dict(os.environ, entry.env or {}))
        entry.call(meta(n, v, dt=dt).requires_grad_(), meta(n, v, dt=dt), meta(n, dt=torch.int64))
    return launches


def _jsonable(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str)) or v is None}


def _worker_main() -> None:
    job = json.loads(sys.stdin.read())
    out = []
    for name in job["entries"]:
        entry = ENTRIES[name]
        for shape in map(tuple, job["shapes"]):
            if entry.shapes is not None and shape not in entry.shapes:
                continue
            try:
                for launch in _capture(entry, shape):
                    kernel = launch["fn"].__name__
                    facts = entry.facts(kernel, launch["kwargs"], shape, launch["programs"])
                    if facts is None:
                        continue
                    compiled = sass.compile_sm90(launch["fn"], launch["args"], launch["kwargs"])
                    out.append(dict(entry=name, shape=shape, kernel=kernel, kwargs=_jsonable(launch["kwargs"]),
                                    programs=launch["programs"], config=launch["config"], facts=asdict(facts),
                                    compiled=asdict(compiled)))
            except sass.SassToolsMissing:
                raise
            except Exception as exc:  # a kernel that does not build yet is a row saying so, not a lost table
                out.append(dict(entry=name, shape=shape, error=f"{type(exc).__name__}: {_first_line(exc)}"))
    print(json.dumps(out))


def _first_line(exc: Exception) -> str:
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    # the package's own module, not this __main__ copy: entries registered from elsewhere live in its ENTRIES
    from kdbench.kernels import static_configs

    static_configs._worker_main()
