"""The static cost model (kernels/static_model.py) and the SASS reading under it (kernels/sass.py).

The arithmetic and the control-flow reading are checked on known numbers and on hand-written SASS; the compiler
path on tiny kernels whose counts are known (tests/kernels/sass_probes.py), compiled for sm_90 in a child process
without TRITON_INTERPRET. Those skip, with the reason, where Triton's CUDA tools are absent.
"""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdbench.errors import KdbenchError
from kdbench.kernels import sass, static_model
from kdbench.kernels.static_configs import Facts
from kdbench.kernels.static_model import H200, per_program, predict, programs_per_sm

PROBES = str(Path(__file__).with_name("sass_probes.py"))


def _tools_or_skip():
    try:
        for name in sass.TOOLS:
            sass.tool(name)
    except sass.SassToolsMissing as e:
        pytest.skip(str(e))


# ----------------------------------------------------------------------------------------------------------------
# Arithmetic
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("regs, warps, shared, expected", [
    (64, 4, 0, (8, "registers")),  # 2048 registers a warp: 32 warps
    (220, 1, 0, (9, "registers")),  # 7040 rounded up to 7168 a warp: 9 warps
    (80, 2, 0, (12, "registers")),  # 2560 a warp: 25 warps, 12 programs of 2
    (16, 32, 0, (2, "threads")),  # 1024 threads a program
    (32, 1, 0, (32, "blocks")),
    (32, 1, 100 * 1024, (2, "shared memory")),  # 102400 + 1024 reserved = 103424 of 233472
])
def test_programs_per_sm(regs, warps, shared, expected):
    assert programs_per_sm(regs, warps, shared) == expected


def test_predict_takes_the_largest_of_three_times():
    card = H200(sms=1, clock_hz=1.0, issue_per_clock=4, mufu_per_clock=16)
    t = predict(instructions=8, mufu=2, warps=2, programs=3, hbm_bytes=100, copy_bw=10, card=card)
    assert t["bytes"] == 10  # 100 / 10
    assert t["issue"] == 12  # 8 x 2 warps x 3 programs / 4 per clock
    assert t["MUFU"] == 24  # 2 x 32 lanes x 2 warps x 3 programs / 16 per clock
    assert (t["predicted"], t["bound"]) == (24, "MUFU")
    t = predict(instructions=8, mufu=0, warps=2, programs=3, hbm_bytes=1000, copy_bw=10, card=card)
    assert (t["predicted"], t["bound"]) == (100, "bytes")


def test_the_constants_give_the_h200_rates():
    c = static_model.CARD
    assert c.sms * c.mufu_per_clock * c.clock_hz == pytest.approx(4.18e12, rel=1e-3)  # kernels/TUNING.md's 4.2e12
    assert c.sms * c.issue_per_clock * c.clock_hz == pytest.approx(1.045e12, rel=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Reading SASS (hand-written, in cuobjdump's layout)
# ----------------------------------------------------------------------------------------------------------------

SASS = """
        Function : probe
        /*0000*/                   S2R R0, SR_TID.X ;                  /* 0x0000000000007919 */
        /*0010*/                   ISETP.NE.AND P0, PT, R0, RZ, PT ;   /* 0x000000ff0000720c */
        /*0020*/               @P0 BRA 0x80 ;                          /* 0x0000000400000947 */
        /*0030*/                   STG.E desc[UR4][R2.64], RZ ;        /* 0x000000ff02007986 */
        /*0040*/                   ISETP.GE.AND P1, PT, R0, 0x4, PT ;  /* 0x000000040000780c */
        /*0050*/              @!P1 BRA 0x30 ;                          /* 0xfffffffc00009947 */
        /*0060*/                   EXIT ;                              /* 0x000000000000794d */
        /*0070*/                   NOP;                                /* 0x0000000000007918 */
        /*0080*/                   LDG.E.128 R4, desc[UR4][R2.64] ;    /* 0x0000000402047981 */
        /*0090*/                   MUFU.EX2 R5, R4 ;                   /* 0x0000000400057308 */
        /*00a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;       /* 0x0000000000007b1d */
        /*00b0*/                   FADD R6, R5, R6 ;                   /* 0x0000000605067221 */
        /*00c0*/               @P1 BRA 0x80 ;                          /* 0xfffffffc00001947 */
        /*00d0*/                   STG.E.64 desc[UR4][R2.64], R6 ;     /* 0x0000000602007986 */
        /*00e0*/                   EXIT ;                              /* 0x000000000000794d */
        /*00f0*/                   BRA 0xf0;                           /* 0xfffffffc00fc7947 */
"""


def test_analyze_finds_the_hot_loop_and_the_longest_path():
    a = sass.analyze(SASS)
    cold, hot = a.loops  # the trap at 0xf0 (after EXIT) is unreachable, so no loop
    assert (cold.start, cold.end, cold.on_path) == (0x30, 0x50, False)  # the shorter way out
    assert (hot.start, hot.end, hot.on_path) == (0x80, 0xC0, True)
    assert a.hot() == [hot] == a.hot("outermost")
    assert hot.counts["instructions"] == 5 and hot.counts["MUFU.EX2"] == 1 and hot.counts["barriers"] == 1
    assert hot.counts["global bytes"] == 16
    assert a.path["instructions"] == 3 + 5 + 2  # entry block, the loop once, the store and exit
    assert a.path["global bytes"] == 16 + 8 and a.path["global loads"] == 1 and a.path["global stores"] == 1


@pytest.mark.parametrize("tile, unroll", [(4, 1), (1, 4)])
def test_per_program_adds_the_loop_trips_and_finds_the_unroll(tile, unroll):
    # the loop moves 16 bytes a thread, 4 per element by design: 4 elements an iteration, so 100 over 400
    # elements, whether the source tile is 4 elements or 1 unrolled 4 times
    facts = Facts(elements=400, bytes_per_element=4, tile=tile, loop_bytes=(4,))
    per = per_program(sass.analyze(SASS), facts, threads=1)
    (lp,) = per["loops"]
    assert (lp["unroll"], lp["per_iter"], lp["trips"]) == (unroll, 4, 100)
    assert lp["instructions"] == 5 / 4
    run = per["run"]
    assert run["instructions"] == 10 + 5 * 99
    assert run["MUFU.EX2"] == run["barriers"] == 100
    assert run["global bytes"] == 16 * 100 + 8


def test_per_program_takes_the_designs_trips():
    facts = Facts(elements=400, bytes_per_element=4, tile=4, loop_bytes=(4,), trips=33.5)
    (lp,) = per_program(sass.analyze(SASS), facts, threads=1)["loops"]
    assert lp["trips"] == 33.5


def test_per_program_refuses_a_design_that_is_not_the_sass():
    with pytest.raises(KdbenchError, match="1 hot"):
        per_program(sass.analyze(SASS), Facts(elements=400, bytes_per_element=4, tile=4, loop_bytes=(4, 4)), 1)


class _NoTools:
    """triton.knobs.nvidia of an install whose tools are gone: Triton's own lookup raises."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"Cannot find {name}")


@pytest.mark.parametrize("knobs", [_NoTools(), object()], ids=["file missing", "no such knob"])
def test_a_missing_tool_is_one_line(monkeypatch, knobs):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton.knobs, "nvidia", knobs)
    with pytest.raises(sass.SassToolsMissing, match="analysis needs ptxas: not in the Triton wheel") as e:
        sass.compile_sm90(None, (), {})
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# The measured table
# ----------------------------------------------------------------------------------------------------------------

MEASURED = """\
| shape (N x V) | dtype | implementation | median ms | GB/s (3 N V bytes) | of copy BW |
|---|---|---|---:|---:|---:|
| 64 x 1000 | float32 | kd_loss (triton) | 0.5 | 1000 | 0.25 |
| 64 x 1000 | float32 | (copy, for scale) |  | 4000 | 1.00 |
| 64 x 9000 | bfloat16 | (copy, for scale) |  | 4200 | 1.00 |
"""


def test_measured_rows_and_copy_bandwidth(tmp_path):
    path = tmp_path / "gpu.md"
    path.write_text(MEASURED)
    rows = static_model.measured_rows(path)
    assert rows[(64, 1000, "float32", "kd_loss (triton)")] == (0.5, 1000.0, 3)
    assert static_model.copy_bandwidth(rows, (64, 1000, "float32")) == (4000e9, 4)
    # a shape without its own copy: the largest copy measured (64 x 9000 x 2 bytes)
    assert static_model.copy_bandwidth(rows, (8, 8, "float32")) == (4200e9, 5)


def test_the_repository_measured_table_has_the_copy_lines():
    rows = static_model.measured_rows()
    lines = static_model.MEASURED.read_text().splitlines()
    for shape in static_model.SHAPES:
        bw, no = static_model.copy_bandwidth(rows, shape)
        assert "(copy, for scale)" in lines[no - 1] and f"{shape[0]} x {shape[1]} | {shape[2]}" in lines[no - 1]
        assert f"| {bw / 1e9:g} |" in lines[no - 1]


# ----------------------------------------------------------------------------------------------------------------
# Compiled for sm_90
# ----------------------------------------------------------------------------------------------------------------

N_EXP = 1 << 20  # elements the exp2 probe sums
F32 = {"tensor": "float32"}


@pytest.fixture(scope="module")
def probes():
    _tools_or_skip()
    jobs = [
        dict(path=PROBES, function="exp2_sum", args=[F32, F32, N_EXP], kwargs=dict(BLOCK=1024, num_warps=4)),
        dict(path=PROBES, function="copy", args=[F32, F32], kwargs=dict(BLOCK=1024, num_warps=4)),
        dict(path=PROBES, function="tile_sum", args=[F32, F32], kwargs=dict(BLOCK=1024, num_warps=4)),
        dict(path=PROBES, function="tile_sum", args=[F32, F32], kwargs=dict(BLOCK=1024, num_warps=1)),
    ]
    return dict(zip(["exp2", "copy", "sum4", "sum1"], sass.compile_in_subprocess(jobs)))


def test_exp2_loop_is_one_mufu_ex2_per_element(probes):
    c = probes["exp2"]
    assert c.num_warps == 4 and c.regs > 0 and c.local == 0
    a = sass.analyze(c.sass)
    (lp,) = a.hot()
    per = per_program(a, Facts(elements=N_EXP, bytes_per_element=4, tile=1024, loop_bytes=(4,)), threads=128)
    (info,) = per["loops"]
    # in the loop: exactly one ex2 per element, however far ptxas unrolled it
    assert lp.counts["MUFU.EX2"] / info["per_iter"] == 1
    assert lp.counts["MUFU"] == lp.counts["MUFU.EX2"]
    ept = N_EXP / 128
    # over the program: within the remainder code that the longest path counts once (a few tiles of 2^20)
    assert per["run"]["MUFU.EX2"] / ept == pytest.approx(1, rel=0.01)
    assert per["run"]["global bytes"] / ept == pytest.approx(4, rel=0.01)
    assert per["run"]["barriers"] == 0


def test_copy_moves_8_bytes_per_element_with_no_mufu(probes):
    c = probes["copy"]
    a = sass.analyze(c.sass)
    assert a.loops == []
    assert a.path["MUFU"] == 0 and a.path["barriers"] == 0
    assert a.path["global bytes"] / (1024 / 128) == 8  # 16-byte loads and stores: 2 of each per thread


def test_a_sum_across_warps_waits_at_barriers_and_one_warp_does_not(probes):
    assert sass.analyze(probes["sum4"].sass).path["barriers"] >= 1
    assert sass.analyze(probes["sum1"].sass).path["barriers"] == 0
    assert probes["sum1"].num_warps == 1


def test_kdbench_bench_kernels_static_writes_the_table(tmp_path, monkeypatch):
    """The command end to end, on the small shape only: the production kernel as its launcher launches it, with
    the measured H200 time and the ratio beside the prediction."""
    _tools_or_skip()
    from kdbench.cli import app

    shape = (65536, 1000, "float32")
    monkeypatch.setattr(static_model, "SHAPES", [shape])
    out = tmp_path / "static.md"
    result = CliRunner().invoke(app, ["bench", "kernels", "--static", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"written to {out}" in result.output
    text = out.read_text()
    assert f"`kdbench bench kernels --static --out {out}`" in text
    ms, _, line = static_model.measured_rows()[(*shape, "kd_loss (triton)")]
    row = next(x for x in text.splitlines() if x.startswith("| kd_loss (triton) | 65536 x 1000")
               and f"{ms:g} ({line})" in x)
    cells = [x.strip() for x in row.strip("|").split("|")]
    predicted, ratio = float(cells[7]), float(cells[12])
    assert ratio == pytest.approx(ms / predicted, abs=0.01)
    sass_row = next(x for x in text.splitlines() if x.startswith("| kd_loss (triton) | 65536 x 1000")
                    and "whole row" in x)
    cells = [x.strip() for x in sass_row.strip("|").split("|")]
    regs, sass_bytes, design_bytes = int(cells[5]), float(cells[14]), float(cells[15])
    assert regs > 0
    assert design_bytes == 12  # read s and t, write the gradient, fp32
    assert sass_bytes >= design_bytes  # every thread's loads and stores at least cover its elements
    assert re.search(r"line \d+\)", text)  # the copy bandwidth names its line


def test_static_without_the_measured_table_is_a_one_line_error(tmp_path, monkeypatch):
    from kdbench.cli import app

    monkeypatch.setattr(static_model, "MEASURED", tmp_path / "absent.md")
    result = CliRunner().invoke(app, ["bench", "kernels", "--static", "--out", str(tmp_path / "x.md")])
    assert result.exit_code == 2
    assert "absent.md, which is missing" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.md").exists()
