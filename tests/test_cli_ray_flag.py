"""`kdbench run SUITE --ray [ADDRESS]`: the address is optional, and a suite path is never taken for one."""

import sys

import pytest

from kdbench import cli


@pytest.mark.parametrize("args, expected", [
    (["run", "s.yaml", "--ray"], ["run", "s.yaml", "--ray"]),
    (["run", "s.yaml", "--ray", "auto"], ["run", "s.yaml", "--ray", "--ray-address", "auto"]),
    (["run", "s.yaml", "--ray", "head:6379", "-v"], ["run", "s.yaml", "--ray", "--ray-address", "head:6379", "-v"]),
    (["run", "s.yaml", "--ray=ray://head:10001"], ["run", "s.yaml", "--ray", "--ray-address", "ray://head:10001"]),
    (["run", "--ray", "s.yaml"], ["run", "--ray", "s.yaml"]),  # a suite after --ray stays the suite
    (["run", "s.yaml", "--ray", "--rerun"], ["run", "s.yaml", "--ray", "--rerun"]),
])
def test_ray_address_is_optional(args, expected):
    assert cli.ray_address_as_option(args) == expected


@pytest.mark.parametrize("argv, address", [(["--ray"], None), (["--ray", "auto"], "auto"),
                                           (["--ray", "ray://head:10001"], "ray://head:10001")])
def test_the_command_passes_the_address_to_the_runner(monkeypatch, tmp_path, argv, address):
    seen = {}

    def fake_run(suite, results_dir, **kwargs):
        seen.update(kwargs)
        raise cli.KdbenchError("stop here")

    monkeypatch.setattr(cli, "_run", fake_run)
    monkeypatch.setattr(sys, "argv", ["kdbench", "run", str(tmp_path / "s.yaml"), *argv])
    with pytest.raises(SystemExit) as stop:
        cli.app()
    assert stop.value.code == 2
    assert seen["ray"] is True and seen["ray_address"] == address
