"""The CLI's help and start-up: --version, real boolean flags, help for every option, no third-party noise."""

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

import kdbench
from kdbench.cli import app


def commands(group, prefix=()):  # typer vendors click: duck-type its groups and options
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


CLICK_APP = typer.main.get_command(app)
ALL = list(commands(CLICK_APP))
assert ("bench", "kernels") in dict(ALL) and ("run",) in dict(ALL)  # the walk reaches every command


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"kdbench {kdbench.__version__}"


@pytest.mark.parametrize("path, cmd", ALL, ids=[" ".join(p) for p, _ in ALL])
def test_every_option_has_help_and_flags_take_no_value(path, cmd):
    for param in cmd.params:
        if param.param_type_name == "option":
            assert param.help, f"kdbench {' '.join(path)} {param.opts[0]} has no help"
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.stdout and "BOOLEAN" not in result.stdout, result.stdout


def test_flags_are_flags():
    run = dict(ALL)[("run",)]
    flags = {p.name: p for p in run.params if p.param_type_name == "option"}
    for name in ("rerun", "dry_run", "verbose", "no_wait"):
        assert flags[name].is_flag, name


def test_importing_kdbench_and_torchao_prints_nothing():
    """torchao's C-extension warnings and torch's Enum-registration deprecation are dropped at import time."""
    pytest.importorskip("torchao")
    code = "import kdbench.cli, kdbench.compress, torchao.quantization"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "", proc.stderr


def test_other_torchao_warnings_still_show():
    code = ("import kdbench, logging; logging.getLogger('torchao').warning('a real torchao warning'); "
            "logging.getLogger('torchao').warning('Failed to load x.so: y')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stderr.splitlines() == ["a real torchao warning"], proc.stderr
