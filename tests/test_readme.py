"""Every ```python block in README.md runs as written, so a README that drifts from the API fails CI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3  # the classifier, the causal LM and the loss examples


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KDBENCH_KERNEL")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{proc.stderr[-3000:]}"


def test_readme_is_at_most_15_kb():
    assert len(README.read_bytes()) <= 15_000


def test_readme_test_command_is_what_ci_runs():
    """The README's test command, with pip's -q, is the line .ci/run executes."""
    text = README.read_text()
    command = re.search(r"pip install torch==2\.13\.0 && pip install -e \"\.\[test[^\]]*\]\" && [^\n`]*", text)
    assert command, "the README lost its test command"
    ci = (README.parent / ".ci" / "run").read_text()
    assert command.group(0).replace("pip install ", "pip install -q ") in ci.splitlines()


def test_readme_links_point_at_files():
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text())
    missing = [t for t in targets if not (README.parent / t).exists()]
    assert targets and not missing, missing


def test_readme_suite_format_block_is_a_valid_suite():
    """The suite-format block lists every key with its default: it must pass the schema as written."""
    import yaml

    from kdbench.suite import Suite

    (block,) = re.findall(r"^```yaml\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    Suite.model_validate(yaml.safe_load(block))
