"""Runs a kernel test's build script for sm_90 in a child process: Triton's bundled ptxas, no GPU needed, and
without TRITON_INTERPRET (which the test process has on). Used by test_kd_loss{,_split,_persistent}.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def build_for_sm90(script: str, expected_builds: int) -> None:
    """Run `script`, which prints 'compiled <n>'; skip where Triton's CUDA backend or its ptxas is missing."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KDBENCH_KERNEL")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    if out.returncode != 0 and "ptxas" in out.stderr and "No such file" in out.stderr:
        pytest.skip("Triton's ptxas is missing here")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"compiled {expected_builds}" in out.stdout.split("\n"), out.stdout[-3000:]
