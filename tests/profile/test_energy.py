"""measure_energy: None, never 0, where there is no energy counter."""

from kdbench.profile import measure_energy


def test_energy_is_none_on_cpu(model, make_inputs):
    res = measure_energy(model, make_inputs, 2, "cpu")
    assert res["joules_per_sample"] is None and res["method"].startswith("n/a")
