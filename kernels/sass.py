"""A Triton kernel compiled for sm_90 on a machine without a GPU, and what its SASS holds.

`compile_sm90(fn, args, kwargs)` builds one launch of a @triton.jit function with Triton's own compiler, specialized
exactly as a launch with those arguments would be (Triton's binder: 16-byte aligned pointers, integers divisible by
16, integers equal to 1), for GPUTarget("cuda", 90, 32), and disassembles the cubin with the cuobjdump that the
Triton wheel ships. `analyze(sass)` reads the instruction list: basic blocks, loops (backward branches), and the
instructions, MUFU ops, barriers and memory operations along the longest path through a program and inside each
innermost loop. Compiling needs real JIT functions, so under TRITON_INTERPRET=1 (the tests) it runs in a
subprocess with that variable removed: `compile_in_subprocess`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kdbench.errors import KdbenchError

TOOLS = ("ptxas", "cuobjdump")


class SassToolsMissing(KdbenchError):
    """Triton, its CUDA backend, or the CUDA tools in its wheel (ptxas, cuobjdump) are not installed."""


def tool(name: str) -> str:
    """Path of one of the CUDA tools Triton uses (TRITON_<NAME>_PATH, else the copy in the Triton wheel)."""
    try:
        import triton

        return getattr(triton.knobs.nvidia, name).path
    except ImportError:
        raise SassToolsMissing("static kernel analysis needs triton (pip install triton)") from None
    except (AttributeError, RuntimeError):
        raise SassToolsMissing(f"static kernel analysis needs {name}: not in the Triton wheel "
                               f"(triton/backends/nvidia/bin) nor at TRITON_{name.upper()}_PATH") from None


def tool_version(name: str) -> str:
    import triton

    tool(name)
    return getattr(triton.knobs.nvidia, name).version


# ----------------------------------------------------------------------------------------------------------------
# Compile and disassemble
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Compiled:
    name: str
    num_warps: int
    shared: int  # bytes of shared memory per program: Triton's dynamic shared plus the cubin's static
    regs: int  # registers per thread (cuobjdump -res-usage REG)
    stack: int  # bytes of stack frame per thread (STACK): where ptxas puts spilled registers (STL/LDL)
    local: int  # bytes of other local memory per thread (LOCAL)
    sass: str


def _pointer_stand_in(arg):
    """A 16-byte aligned one-element CPU tensor of arg's dtype for every tensor argument: Triton specializes a
    pointer on its type and alignment only (torch allocations are 16-byte aligned, on a GPU as on the CPU)."""
    import torch

    return torch.empty(1, dtype=arg.dtype) if isinstance(arg, torch.Tensor) else arg


def compile_sm90(fn, args: tuple, kwargs: dict) -> Compiled:
    """Compile fn(*args, **kwargs) (constexprs and launch options such as num_warps in kwargs) for sm_90."""
    for name in TOOLS:
        tool(name)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(fn, JITFunction):
        raise KdbenchError(f"{getattr(fn, '__name__', fn)!r} is not a compiled @triton.jit function "
                           "(TRITON_INTERPRET=1 is set: use compile_in_subprocess)")
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    bound, specialization, options = binder(*[_pointer_stand_in(a) for a in args],
                                            **{k: _pointer_stand_in(v) for k, v in kwargs.items()})
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = _run([tool("cuobjdump"), "-sass", str(cubin)])
        usage = _run([tool("cuobjdump"), "-res-usage", str(cubin)])
    res = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return Compiled(name=kernel.metadata.name, num_warps=kernel.metadata.num_warps,
                    shared=kernel.metadata.shared + int(res.get("SHARED", 0)), regs=int(res["REG"]),
                    stack=int(res.get("STACK", 0)), local=int(res.get("LOCAL", 0)), sass=sass)


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise KdbenchError(f"{Path(cmd[0]).name} failed: {' '.join(done.stderr.strip().splitlines()[-1:])}")
    return done.stdout


def clean_env() -> dict:
    """This process's environment without TRITON_INTERPRET: a child that compiles for a real target."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def worker(module: str, payload: dict, timeout: float = 600) -> list:
    """Run `python -m module --worker` with the JSON payload on stdin in a clean environment; its JSON reply (the
    last line of its stdout). Its failure is one line: the exception's message, without the traceback."""
    try:
        done = subprocess.run([sys.executable, "-m", module, "--worker"], input=json.dumps(payload), text=True,
                              capture_output=True, env=clean_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise KdbenchError(f"{module} --worker took more than {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        last = re.sub(r"^[\w.]+: ", "", lines[-1]) if lines else f"{module} --worker failed: code {done.returncode}"
        raise (SassToolsMissing if "SassToolsMissing" in done.stderr else KdbenchError)(last)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_in_subprocess(jobs: list[dict]) -> list[Compiled]:
    """compile_sm90 of each job, dict(path=a Python file, function=its @triton.jit name, args=[...], kwargs={...}),
    in one clean child process; a tensor argument is written {"tensor": "float32"}."""
    return [Compiled(**c) for c in worker(__name__, dict(jobs=jobs))]


def _decode(x):
    import torch

    return torch.empty(1, dtype=getattr(torch, x["tensor"])) if isinstance(x, dict) and "tensor" in x else x


def _worker_main() -> None:
    import importlib.util
    from dataclasses import asdict

    out = []
    for job in json.loads(sys.stdin.read())["jobs"]:
        spec = importlib.util.spec_from_file_location(Path(job["path"]).stem, job["path"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out.append(asdict(compile_sm90(getattr(module, job["function"]), tuple(_decode(a) for a in job["args"]),
                                       {k: _decode(v) for k, v in job["kwargs"].items()})))
    print(json.dumps(out))


# ----------------------------------------------------------------------------------------------------------------
# Read the SASS
# ----------------------------------------------------------------------------------------------------------------

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
MEMORY = {"LDG": "global loads", "STG": "global stores", "LDS": "shared loads", "STS": "shared stores",
          "LDL": "local loads", "STL": "local stores", "ATOMG": "atomics", "ATOM": "atomics", "RED": "atomics",
          "LDGSTS": "async copies"}


@dataclass(frozen=True)
class Instr:
    addr: int
    predicate: str  # "" or e.g. "@!P0"
    opcode: str  # with its modifiers: "MUFU.EX2", "LDG.E.128"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    def global_bytes(self) -> int:
        """Bytes per thread that an LDG/STG moves, from its width modifier (32 bits without one)."""
        if self.base not in ("LDG", "STG"):
            return 0
        mods = set(self.opcode.split(".")[1:])
        return 16 if "128" in mods else 8 if "64" in mods else 2 if mods & {"U16", "S16"} else \
            1 if mods & {"U8", "S8"} else 4


def parse(sass: str) -> list[Instr]:
    """The instructions of the (first) function in `cuobjdump -sass` text, in address order."""
    out = []
    for m in _LINE.finditer(sass):
        out.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    if not out:
        raise KdbenchError("no SASS instructions found in the disassembly")
    return out


def tally(instrs) -> Counter:
    """Counts of one run through `instrs`: 'instructions', 'MUFU', 'MUFU.EX2' ..., 'barriers', the MEMORY kinds,
    and 'global bytes' (per thread)."""
    c = Counter()
    for i in instrs:
        c["instructions"] += 1
        if i.base == "MUFU":
            c["MUFU"] += 1
            c[i.opcode] += 1
        elif i.base == "BAR":
            c["barriers"] += 1
        elif i.base in MEMORY:
            c[MEMORY[i.base]] += 1
        c["global bytes"] += i.global_bytes()
    return c


def _branch_target(i: Instr) -> int | None:
    hexes = re.findall(r"0x([0-9a-f]+)", i.operands)
    return int(hexes[-1], 16) if i.base == "BRA" and hexes else None


def _conditional(i: Instr) -> bool:
    # "@P0 BRA 0x150", "BRA.U !UP0, 0x..." and "BRA.DIV UR4, 0x..." may fall through; "BRA 0x150" never does
    return (i.predicate not in ("", "@PT")) or "," in i.operands


@dataclass
class Loop:
    start: int  # address of the loop header (the backward branch's target)
    end: int  # address of the backward branch
    counts: Counter = field(default_factory=Counter)  # one iteration: every instruction in [start, end]
    innermost: bool = True  # holds no other loop
    outermost: bool = True  # lies in no other loop
    on_path: bool = False  # its header is on the longest path: the loop a full program runs (not, e.g., the
    #                        zero-fill of an ignored row)


@dataclass
class Analysis:
    path: Counter  # along the longest path from entry to an exit, each loop body once (back edges dropped)
    loops: list[Loop]  # innermost and outer, reachable from the entry, by address

    def hot(self, level: str = "innermost") -> list[Loop]:
        """The loops on the longest path at `level`: 'innermost' (tile loops) or 'outermost' (a persistent
        program's work loop, whose inner loops, such as a spin-wait, count once per iteration)."""
        if level not in ("innermost", "outermost"):
            raise ValueError(f"hot loop level {level!r} is not 'innermost' or 'outermost'")
        return [lp for lp in self.loops if lp.on_path and getattr(lp, level)]


def analyze(sass: str) -> Analysis:
    """Blocks split at branch targets and after branches and exits; CALLs are not followed (a callee, e.g. a slow
    path, is unreachable here and so neither counted nor taken for a loop)."""
    instrs = parse(sass)
    index = {i.addr: n for n, i in enumerate(instrs)}
    leaders = {0}
    for n, i in enumerate(instrs):
        t = _branch_target(i)
        if t is not None and t in index:
            leaders.add(index[t])
        if i.base in ("BRA", "EXIT", "RET", "BRX", "JMX") and n + 1 < len(instrs):
            leaders.add(n + 1)
    starts = sorted(leaders)
    blocks = [range(a, b) for a, b in zip(starts, starts[1:] + [len(instrs)])]
    block_of = {s: k for k, s in enumerate(starts)}

    def successors(k: int) -> list[int]:
        last = instrs[blocks[k][-1]]
        t = _branch_target(last)
        nxt = [k + 1] if k + 1 < len(blocks) else []
        if last.base == "BRA" and t in index:
            return [block_of[index[t]]] + (nxt if _conditional(last) else [])
        if last.base in ("EXIT", "RET", "BRX", "JMX") and not (last.base == "EXIT" and _conditional(last)):
            return []
        return nxt

    reach, todo = {0}, [0]
    while todo:
        for s in successors(todo.pop()):
            if s not in reach:
                reach.add(s)
                todo.append(s)
    # Loops: a reachable backward branch (its target at or before it); branches to one header merge.
    ends: dict[int, int] = {}
    for k in reach:
        last = instrs[blocks[k][-1]]
        t = _branch_target(last)
        if last.base == "BRA" and t is not None and t <= last.addr and t in index:
            ends[t] = max(ends.get(t, t), last.addr)
    loops = [Loop(s, e, tally(i for i in instrs if s <= i.addr <= e)) for s, e in sorted(ends.items())]
    for lp in loops:
        lp.innermost = not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in loops)
        lp.outermost = not any(o is not lp and o.start <= lp.start and lp.end <= o.end for o in loops)
    # Longest path over the forward edges (blocks in address order are a topological order of them).
    best: dict[int, tuple[int, int | None]] = {0: (len(blocks[0]), None)}
    for k in sorted(reach):
        if k not in best:
            continue
        for s in successors(k):
            if s > k and best[k][0] + len(blocks[s]) > best.get(s, (-1, None))[0]:
                best[s] = (best[k][0] + len(blocks[s]), k)
    exits = [k for k in best if not successors(k)] or list(best)
    k, path, on_path = max(exits, key=lambda b: best[b][0]), Counter(), set()
    while k is not None:
        path += tally(instrs[n] for n in blocks[k])
        on_path.add(instrs[blocks[k][0]].addr)
        k = best[k][1]
    for lp in loops:
        lp.on_path = lp.start in on_path
    return Analysis(path=path, loops=loops)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
