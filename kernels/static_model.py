"""A static cost model of the kd_loss kernels on an H200, computed on a CPU: `kdbench bench kernels --static`.

Every configuration of kernels/static_configs.py is compiled for sm_90 and its SASS read (kernels/sass.py). Then

    predicted = max(bytes / copy BW, warp instructions / issue rate, MUFU lane ops / MUFU rate)

with the H200's constants below and the copy bandwidth measured on one (results/kernels/nvidia-h200.md). It sees
neither latency nor caches: the measured / predicted ratio in the table says how far that is from a real run.
"""

from __future__ import annotations

import datetime
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kdbench.errors import KdbenchError
from kdbench.kernels import sass
from kdbench.kernels.static_configs import ALPHA, ENTRIES, ITEMSIZE, SHAPES, TEMPERATURE, Facts

REPO = Path(__file__).resolve().parents[1]  # kernels/ sits at the top of the repository
MEASURED = REPO / "results" / "kernels" / "nvidia-h200.md"
DEFAULT_OUT = REPO / "results" / "kernels" / "static-sm90.md"


@dataclass(frozen=True)
class H200:
    """The card's constants, all in one place, with where each comes from."""

    sms: int = 132  # H200 SXM: the full GH100 of an H100 SXM5, 132 SMs (NVIDIA H200 datasheet)
    clock_hz: float = 1.98e9  # the SM boost clock of H100/H200 SXM (nvidia-smi's max SM clock, 1980 MHz)
    issue_per_clock: int = 4  # 4 SM sub-partitions, each with one scheduler issuing 1 warp instruction per clock
    #                           (NVIDIA Hopper architecture whitepaper)
    mufu_per_clock: int = 16  # lanes of ex2/lg2/rcp/rsqrt per SM per clock, compute capability 9.0 (CUDA C++
    #                           Programming Guide, "Arithmetic Instructions" throughput table): quarter rate
    regs_per_sm: int = 65536  # the rest: CUDA C++ Programming Guide, "Technical Specifications" for 9.0,
    threads_per_sm: int = 2048  # and the CUDA occupancy calculator's allocation rules for 9.0
    blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024  # with the largest carveout
    smem_reserved_per_block: int = 1024  # the system's 1 KB per block
    smem_granularity: int = 128
    reg_alloc_per_warp: int = 256  # registers are allocated per warp in units of 256


CARD = H200()


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


def programs_per_sm(regs: int, warps: int, shared: int, card: H200 = CARD) -> tuple[int, str]:
    """Resident programs per SM and the resource that bounds them (the occupancy calculator's rules)."""
    regs_per_warp = math.ceil(regs * 32 / card.reg_alloc_per_warp) * card.reg_alloc_per_warp
    smem = math.ceil((shared + card.smem_reserved_per_block) / card.smem_granularity) * card.smem_granularity
    limits = {"registers": card.regs_per_sm // max(regs_per_warp, 1) // warps,
              "threads": card.threads_per_sm // (32 * warps), "blocks": card.blocks_per_sm,
              "shared memory": card.smem_per_sm // smem}
    bound = min(limits, key=limits.get)
    return limits[bound], bound


def predict(instructions: float, mufu: float, warps: int, programs: int, hbm_bytes: float, copy_bw: float,
            card: H200 = CARD) -> dict:
    """Times in seconds: instructions and mufu are per thread per program (one warp instruction each per warp)."""
    times = {"bytes": hbm_bytes / copy_bw,
             "issue": instructions * warps * programs / (card.sms * card.issue_per_clock * card.clock_hz),
             "MUFU": mufu * 32 * warps * programs / (card.sms * card.mufu_per_clock * card.clock_hz)}
    bound = max(times, key=times.get)
    return dict(times, predicted=times[bound], bound=bound)


def per_program(analysis: sass.Analysis, facts: Facts, threads: int) -> dict:
    """Counts one program runs (per thread), from the longest path plus each hot loop's remaining iterations."""
    hot = analysis.hot(facts.hot)
    if len(hot) != len(facts.loop_bytes):
        raise KdbenchError(f"the SASS has {len(hot)} hot ({facts.hot}) loops, the design facts describe "
                           f"{len(facts.loop_bytes)}")
    run, loops = Counter(analysis.path), []
    for lp, b in zip(hot, facts.loop_bytes):
        # the loop's bytes / the design's bytes per element: elements per thread per iteration, slightly over the
        # tile's by the per-row scalars every thread loads; rounded, an unroll factor of the source loop
        ratio = lp.counts["global bytes"] / b / (facts.tile / threads)
        if ratio <= 0:
            raise KdbenchError(f"hot loop at {lp.start:#x} moves no global bytes; the model cannot size it")
        unroll = max(1, round(ratio))
        per_iter = unroll * facts.tile / threads
        trips = facts.trips / unroll if facts.trips is not None else math.ceil(facts.elements / (unroll * facts.tile))
        for k, c in lp.counts.items():
            run[k] += c * (trips - 1)
        loops.append(dict(per_iter=per_iter, trips=trips, instructions=lp.counts["instructions"] / per_iter,
                          unroll=unroll, bytes_ratio=ratio))
    return dict(run=run, loops=loops)


def evaluate(record: dict, copy_bw: float, card: H200 = CARD) -> dict:
    """One row of the table from a worker record (kernel, shape, facts, compiled)."""
    c, f = sass.Compiled(**record["compiled"]), Facts(**{**record["facts"],
                                                          "loop_bytes": tuple(record["facts"]["loop_bytes"])})
    n, v, _ = record["shape"]
    threads = 32 * c.num_warps
    per = per_program(sass.analyze(c.sass), f, threads)
    run, ept = per["run"], f.elements / threads  # ept: elements per thread
    occupancy = programs_per_sm(c.regs, c.num_warps, c.shared, card)
    times = predict(run["instructions"], run["MUFU"], c.num_warps, record["programs"],
                    f.bytes_per_element * n * v, copy_bw, card)
    return dict(
        record=record, compiled=c, facts=f, loops=per["loops"], occupancy=occupancy, times=times,
        per_element={"SASS": run["instructions"] / ept, "MUFU": run["MUFU"] / ept,
                     **{op: run[op] / ept for op in ("MUFU.EX2", "MUFU.LG2", "MUFU.RCP")},
                     "global bytes": run["global bytes"] / ept},
        barriers=run["barriers"], spill_ops=run["local loads"] + run["local stores"],
        floor=3 * ITEMSIZE[record["shape"][2]] * n * v / copy_bw,
    )


# ----------------------------------------------------------------------------------------------------------------
# Measured numbers and the table
# ----------------------------------------------------------------------------------------------------------------


def measured_rows(path: Path | None = None) -> dict:
    """{(N, V, dtype, implementation): (median ms or None, GB/s or None, line number)} from a kernel table
    (default MEASURED)."""
    path = path or MEASURED
    if not path.is_file():
        raise KdbenchError(f"the static model needs the measured copy bandwidth in {path}, which is missing")
    rows, cols = {}, None
    for no, line in enumerate(path.read_text().splitlines(), 1):
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        if line.startswith("| shape"):
            cols = {name: next(i for i, c in enumerate(cells) if c.startswith(name))
                    for name in ("shape", "dtype", "implementation", "median ms", "GB/s")}
        elif cols and line.startswith("|") and "x" in cells[cols["shape"]]:
            n, v = (int(x) for x in cells[cols["shape"]].split("x"))
            num = lambda name: float(cells[cols[name]]) if cells[cols[name]] else None  # noqa: E731
            rows[(n, v, cells[cols["dtype"]], cells[cols["implementation"]])] = (num("median ms"), num("GB/s"), no)
    return rows


def copy_bandwidth(rows: dict, shape: tuple) -> tuple[float, int]:
    """(bytes/s, line): the measured copy of this shape's N x V tensor, else of the largest one measured."""
    copies = {k[:3]: (gbs, no) for k, (_, gbs, no) in rows.items() if k[3] == "(copy, for scale)" and gbs}
    if not copies:
        raise KdbenchError(f"no '(copy, for scale)' row in {MEASURED}")
    key = tuple(shape) if tuple(shape) in copies else max(copies, key=lambda k: k[0] * k[1] * ITEMSIZE[k[2]])
    gbs, no = copies[key]
    return gbs * 1e9, no


def _ms(x: float | None) -> str:
    return "" if x is None else f"{x * 1e3:.3g}" if x < 1e-3 else f"{x * 1e3:.3f}"


def _launch_label(r: dict) -> str:
    c, cfg, f = r["compiled"], r["record"]["config"], r["facts"]
    warps = f"{c.num_warps} warp" + ("s" if c.num_warps > 1 else "")
    label = f"tile {f.tile}, {warps}" if f.tile else warps
    return label + (f" (autotune {cfg[0]}/{cfg[1]})" if cfg else "")


def render(rows: list[dict], measured: dict, copy: dict, command: str, card: H200 = CARD,
           failed: list[dict] = ()) -> str:
    """The markdown page: constants, derivations, what the SASS holds, and the prediction beside the measurement."""
    import triton

    f = card
    lines = [
        "# kd_loss on sm_90 without a GPU: SASS counts and a static cost model (H200)", "",
        f"Made by `{command}` on {datetime.date.today().isoformat()}; triton {triton.__version__}, compiled with "
        "`triton.compile(ASTSource(...), target=GPUTarget(\"cuda\", 90, 32))` and read with the Triton wheel's "
        f"cuobjdump {sass.tool_version('cuobjdump')}. Each configuration is what its launcher launches on a GPU for "
        f"forward KL + CE, T = {TEMPERATURE}, alpha = {ALPHA}, every row valid, with the gradient (the loss of "
        "`nvidia-h200.md`); for an autotuned kernel, every config of its autotuner.", "",
        "## Constants (kernels/static_model.py, `H200`)", "",
        f"- {f.sms} SMs at {f.clock_hz / 1e9:.2f} GHz (H200 SXM, boost clock).",
        f"- Issue: {f.issue_per_clock} schedulers per SM, 1 warp instruction per clock each: "
        f"{f.sms * f.issue_per_clock * f.clock_hz / 1e12:.3f}e12 warp instructions/s.",
        f"- MUFU (ex2, lg2, rcp, ...): {f.mufu_per_clock} lanes per SM per clock (compute capability 9.0, "
        f"quarter rate): {f.sms * f.mufu_per_clock * f.clock_hz / 1e12:.2f}e12 lane ops/s.",
        f"- Occupancy: {f.regs_per_sm} registers (allocated per warp in units of {f.reg_alloc_per_warp}), "
        f"{f.threads_per_sm} threads, {f.blocks_per_sm} programs, {f.smem_per_sm // 1024} KB shared memory per SM "
        f"({f.smem_reserved_per_block} bytes reserved per program, {f.smem_granularity}-byte granules).",
        "- Copy bandwidth (bytes read + written per second), measured on an H200: "
        + "; ".join(f"{s[0]} x {s[1]} {s[2]}: {bw / 1e9:.0f} GB/s (`results/kernels/nvidia-h200.md` line {no})"
                    for s, (bw, no) in copy.items()) + ".", "",
        "## How the numbers are derived", "",
        "- Registers, and stack + local memory per thread (spilled registers live on the stack: a Triton kernel "
        "has no local arrays): `cuobjdump -res-usage` of the cubin; shared memory: Triton's dynamic shared plus "
        "the cubin's static. Spill ops: the LDL/STL one program runs.",
        "- A program's run: the longest path through its control-flow graph (blocks in address order, backward "
        "branches dropped), each loop body once, plus (trips - 1) more runs of each hot loop. A loop is a "
        "backward branch's target to the branch, every instruction in that range once. A hot loop is one whose "
        "header is on that path, innermost (a tile loop) or, where the design says so, outermost (a persistent "
        "program's work loop: its inner loops, such as a spin-wait, count once per iteration).",
        "- Unroll = a hot loop's LDG + STG bytes per thread (from each instruction's width) / the global bytes per "
        "element that loop moves by design / (the source tile / threads), rounded; the unrounded value is the "
        "bytes ratio in brackets, above 1 by the per-row scalars and statistics each thread also moves. Elements "
        "per thread per iteration = unroll x tile / threads; trips = the design's iterations per program / unroll "
        "(a persistent grid: its rows or tickets / programs), else ceil(elements per program / (unroll x tile)).",
        "- Per element = per thread and program / (elements per program / threads). SASS/elem in hot loops is "
        "each hot loop's body / its elements per iteration, summed.",
        "- HBM bytes per element: the design's reads and writes of N x V tensors times the dtype size (the O(N) "
        "labels and row losses, under 0.2%, left out). SASS global B/elem is what each thread's loads and stores "
        "move, caches aside: it checks the design's count, and is above it by the per-row scalars (label, its "
        "logit, the row loss) that every thread loads or stores, and by masked lanes past a row's end.",
        "- bytes = HBM bytes / copy BW; issue = warp instructions / issue rate; MUFU = lane ops / MUFU rate; "
        "predicted = the largest. Floor = 3 N V bytes / copy BW. The model has no latency, so a kernel that is "
        "latency-bound shows a measured / predicted ratio well above 1.", "",
        "## What the SASS holds", "",
        "| kernel | shape | dtype | launch | design | regs | spills (stack + local B/thread, LDL+STL/program) | shared B | programs/SM "
        "(bound) | hot loops: SASS per iteration, elements/iteration/thread, unroll (bytes ratio) | "
        "SASS/elem hot loops | SASS/elem | MUFU/elem (ex2, lg2, rcp) | barriers/program | SASS global B/elem | "
        "HBM B/elem (design) |",
        "|---|---|---|---|---|---:|---:|---:|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        c, pe, (n, v, dt) = r["compiled"], r["per_element"], r["record"]["shape"]
        hot = "; ".join(f"{lp['instructions'] * lp['per_iter']:.0f}, {lp['per_iter']:.4g}, {lp['unroll']} "
                        f"({lp['bytes_ratio']:.2f})" for lp in r["loops"]) or "none"
        lines.append(
            f"| {r['record']['entry']} | {n} x {v} | {dt} | {_launch_label(r)} | {r['facts'].design} | {c.regs} | "
            f"{c.stack + c.local}, {r['spill_ops']:.0f} | {c.shared} | {r['occupancy'][0]} ({r['occupancy'][1]}) | {hot} | "
            f"{format(sum(lp['instructions'] for lp in r['loops']), '.1f') if r['loops'] else 'no loop'} | "
            f"{pe['SASS']:.1f} | "
            f"{pe['MUFU']:.2f} ({pe['MUFU.EX2']:.2f}, {pe['MUFU.LG2']:.2f}, {pe['MUFU.RCP']:.3f}) | "
            f"{r['barriers']:.0f} | {pe['global bytes']:.2f} | {r['facts'].bytes_per_element:g} |")
    lines += ["", "## Predicted time beside the measured one (H200)", "",
              "| kernel | shape | dtype | launch | bytes ms | issue ms | MUFU ms | predicted ms | bound | floor ms "
              "| predicted / floor | measured ms (line) | measured / predicted |",
              "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        (n, v, dt), t, entry = r["record"]["shape"], r["times"], ENTRIES.get(r["record"]["entry"])
        ms, _, no = measured.get((n, v, dt, entry.measured if entry else None), (None, None, None))
        lines.append(
            f"| {r['record']['entry']} | {n} x {v} | {dt} | {_launch_label(r)} | {_ms(t['bytes'])} | "
            f"{_ms(t['issue'])} | {_ms(t['MUFU'])} | {_ms(t['predicted'])} | {t['bound']} | {_ms(r['floor'])} | "
            f"{t['predicted'] / r['floor']:.2f} | {'' if ms is None else f'{ms:g} ({no})'} | "
            f"{'' if ms is None else format(ms / 1e3 / t['predicted'], '.2f')} |")
    lines += ["", "A measured time is the autotuner's pick, which the measured table does not record: it stands "
              "beside every config of that kernel and shape. Measured times are from `results/kernels/"
              "nvidia-h200.md` (its line in brackets); a kernel without a row there is untimed.", ""]
    if failed:
        lines += ["## Not modelled", ""] + [f"- {r['entry']}, {r['shape'][0]} x {r['shape'][1]} {r['shape'][2]}: "
                                              f"{r['error']}" for r in failed] + [""]
    return "\n".join(lines)


def static_table(out: Path | None = None, entries: list[str] | None = None, command: str = "",
                 shapes: list[tuple] | None = None) -> tuple[str, Path]:
    """Compile every registered configuration (or `entries`) for each of `shapes` (default SHAPES), model it, write
    the page to `out` (default results/kernels/static-sm90.md); returns (markdown, path)."""
    names, shapes = entries or list(ENTRIES), [tuple(s) for s in (shapes or SHAPES)]
    for name in names:
        if name not in ENTRIES:
            raise KdbenchError(f"unknown static model entry {name!r}; available: {', '.join(ENTRIES)}")
    measured = measured_rows()
    copy = {s: copy_bandwidth(measured, s) for s in shapes}
    records = sass.worker("kdbench.kernels.static_configs", dict(entries=names, shapes=shapes))
    rows, failed = [], [rec for rec in records if "error" in rec]
    for rec in records:
        if "error" not in rec:
            try:
                rows.append(evaluate(rec, copy[tuple(rec["shape"])][0]))
            except KdbenchError as exc:  # e.g. the design's hot loops are not the SASS's
                failed.append(dict(rec, error=str(exc)))
    text = render(rows, measured, copy, command or "kdbench bench kernels --static", failed=failed)
    path = Path(out) if out else DEFAULT_OUT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text, path
