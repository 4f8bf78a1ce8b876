#!/usr/bin/env bash
# One-call GPU check of the kd_loss kernel (about 6 minutes on an H100). Run from the repository root:
#     bash .ci/gpu_check.sh            (through the device tool: results land in $OUT)
# It needs torch, triton, pytest and pytest-benchmark, which the GPU image has; it does NOT install kdbench and
# needs none of its heavy dependencies (pydantic, datasets, torchao): a shim package makes
# `kdbench.kernels` (kernels/) and `kdbench.bench`, `kdbench.errors` (kdbench/) importable without running
# kdbench/__init__.py. Optional wheels in .whl/ (e.g. liger-kernel, for the Liger column) are installed first.
# Steps, each under its own time limit, none stopping the next:
#   1. environment report                      -> $OUT/env.txt
#   2. pytest tests/test_kd_loss.py (GPU)       -> $OUT/test_kd_loss.log
#   3. pytest tests/bench/test_bench_kd_loss.py, timed -> $OUT/bench_pytest.log, $OUT/bench.json
#   4. kdbench.bench.bench_kernels()            -> $OUT/kernels/<gpu-slug>.md, $OUT/bench_kernels.log
# The last lines printed are a summary and the kernels table. Exit code: non-zero if the tests failed.
# Local dry run of the non-GPU parts (kernel under the interpreter, small CPU shapes):
#     PYTHON=/work/venv/bin/python OUT=/tmp/gpu_out KDBENCH_GPU_CHECK_BUDGET_S=200 bash .ci/gpu_check.sh

set -u
cd "$(dirname "$0")/.."
REPO="$(pwd)"
OUT="${OUT:-$REPO/gpu_out}"
PY="${PYTHON:-python3}"
BUDGET="${KDBENCH_GPU_CHECK_BUDGET_S:-340}"   # seconds for all steps together
START=$SECONDS
mkdir -p "$OUT/kernels"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

left() { echo $(( BUDGET - (SECONDS - START) )); }
limit() {  # limit WANTED: at most WANTED seconds, at most what is left minus a reserve for later steps
    local want=$1 reserve=${2:-0} l
    l=$(( $(left) - reserve ))
    (( l < want )) && want=$l
    (( want < 10 )) && want=10
    echo "$want"
}

# --- optional wheels (device README: carry .whl) ------------------------------------------------------------
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kdbench_site .whl/*.whl \
        && export PYTHONPATH="/tmp/kdbench_site${PYTHONPATH:+:$PYTHONPATH}"
fi

# --- the shim: kdbench.kernels -> kernels/, everything else -> kdbench/, no kdbench/__init__.py --------------
SHIM="$(mktemp -d /tmp/kdbench_shim.XXXXXX)"
mkdir -p "$SHIM/kdbench"
ln -s "$REPO/kernels" "$SHIM/kdbench/kernels"
cat > "$SHIM/kdbench/__init__.py" <<EOF
"""Test shim made by .ci/gpu_check.sh: the real kdbench/__init__.py (and its dependencies) is not run."""
__version__ = "0.0.0+gpu-check"
__path__ = [__path__[0], "$REPO/kdbench"]
EOF
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"

# --- 1. environment ----------------------------------------------------------------------------------------
{
    echo "date: $(date -u +%FT%TZ)"
    command -v nvidia-smi > /dev/null && nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: missing", exc)
import kdbench.kernels, kdbench.bench  # the shim must make these importable without pydantic
assert "pydantic" not in sys.modules, "importing kdbench.kernels pulled in pydantic"
print("kdbench.kernels from", kdbench.kernels.__file__)
from importlib import metadata
for name in ("pytest", "pytest-benchmark", "pytest-xdist", "liger-kernel", "pydantic"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "absent")
EOF
} > "$OUT/env.txt" 2>&1
SHIM_OK=$?
cat "$OUT/env.txt"
if (( SHIM_OK != 0 )); then
    echo "gpu_check: environment/shim check failed (see above); stopping"
    exit 2
fi

# tests/conftest.py is used when it imports under the shim (it sets the interpreter without CUDA and skips `gpu`
# tests); if someone makes it import pydantic-dependent modules, run without it (fine on a GPU).
CONFTEST_OPT=()
if ! "$PY" -c "import runpy; runpy.run_path('tests/conftest.py')" > /dev/null 2>&1; then
    echo "gpu_check: tests/conftest.py does not import here; running with --noconftest"
    CONFTEST_OPT=(--noconftest)
fi
XDIST_OPT=()
if "$PY" -c "import xdist" > /dev/null 2>&1 && "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    XDIST_OPT=(-n 4)  # Triton compiles dominate; 4 workers share the GPU
fi

# --- 2. kernel tests ---------------------------------------------------------------------------------------
T=$(limit 170 150)
echo "gpu_check: pytest tests/test_kd_loss.py (limit ${T}s)"
timeout -k 10 "$T" "$PY" -m pytest tests/test_kd_loss.py -p no:randomly -p no:cacheprovider -q -ra \
    "${CONFTEST_OPT[@]}" "${XDIST_OPT[@]}" > "$OUT/test_kd_loss.log" 2>&1
TEST_RC=$?
tail -n 25 "$OUT/test_kd_loss.log"

# --- 3. pytest-benchmark, timed --------------------------------------------------------------------------
T=$(limit 60 90)
echo "gpu_check: pytest tests/bench/test_bench_kd_loss.py --benchmark-enable (limit ${T}s)"
timeout -k 10 "$T" "$PY" -m pytest tests/bench/test_bench_kd_loss.py -p no:randomly -p no:cacheprovider -q -o addopts="-ra" \
    "${CONFTEST_OPT[@]}" --benchmark-enable --benchmark-max-time=0.5 --benchmark-json="$OUT/bench.json" \
    --benchmark-columns=min,median,max,rounds > "$OUT/bench_pytest.log" 2>&1
BENCH_RC=$?
tail -n 20 "$OUT/bench_pytest.log"

# --- 4. the kernels table ----------------------------------------------------------------------------------
T=$(limit 400 0)
echo "gpu_check: bench_kernels (limit ${T}s)"
QUICK=0
"$PY" -c "import torch, sys; sys.exit(torch.cuda.is_available())" && QUICK=1  # CPU dry run: quick shapes
timeout -k 10 "$T" "$PY" - "$OUT/kernels" "$QUICK" > "$OUT/bench_kernels.log" 2>&1 <<'EOF'
import logging, sys
from pathlib import Path
from kdbench.bench import bench_kernels

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
print(bench_kernels(out_dir=Path(sys.argv[1]), quick=sys.argv[2] == "1"))
EOF
KERN_RC=$?

# --- summary -----------------------------------------------------------------------------------------------
{
    echo "gpu_check summary ($(( SECONDS - START ))s):"
    echo "  kernel tests:   rc=$TEST_RC   $(grep -E '(passed|failed|error)' "$OUT/test_kd_loss.log" | tail -n 1)"
    echo "  bench pytest:   rc=$BENCH_RC  $(grep -E '(passed|failed|error)' "$OUT/bench_pytest.log" | tail -n 1)"
    echo "  bench_kernels:  rc=$KERN_RC   (124 = ran out of time)"
} | tee "$OUT/summary.txt"
if (( KERN_RC == 0 )); then
    cat "$OUT"/kernels/*.md
else
    tail -n 30 "$OUT/bench_kernels.log"
fi
rm -rf "$SHIM"
exit $(( TEST_RC != 0 ))
