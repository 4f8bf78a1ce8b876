"""Peak memory on a tiny model: in a fork of the warm server, from a model or a saved variant, and in process."""

import pytest

from kdbench.profile import measure_peak_memory, start_memory_server

# The memory fork server imports torch + transformers (seconds): start it at collection, in the background,
# so it is ready by the time the memory tests run.
start_memory_server()

from kdbench.compress import apply_variant, save_variant  # noqa: E402
from kdbench.errors import KdbenchError  # noqa: E402
from kdbench.introspect import tensor_bytes  # noqa: E402


def test_peak_memory_forkserver_from_model_and_from_dir(model, tmp_path, make_inputs):
    # One fork server serves both calls; the first call pays for its start.
    res = measure_peak_memory(model, make_inputs, 8, "cpu")
    assert res["method"].startswith("forkserver: peak RSS")
    assert res["peak_mb"] > 0 and res["resident_mb"] > 0 and res["baseline_mb"] > 100
    assert res["weights_mb"] == pytest.approx(tensor_bytes(model) / 2**20)

    quant, _ = apply_variant(model, [("int8", {})], "cpu")
    save_variant(quant, tmp_path)
    res = measure_peak_memory(tmp_path, make_inputs, 8, "cpu", method="forkserver")
    assert res["peak_mb"] > 0 and res["weights_mb"] < tensor_bytes(model) / 2**20


def test_peak_memory_inprocess_counts_weights_at_least(model, make_inputs):
    res = measure_peak_memory(model, make_inputs, 8, "cpu", method="inprocess")
    assert res["peak_mb"] >= res["weights_mb"] == pytest.approx(tensor_bytes(model) / 2**20)
    assert res["method"].startswith("inprocess")


def test_peak_memory_child_error_is_reported(tmp_path, make_inputs):
    (tmp_path / "config.json").write_text("{}")  # not a model
    with pytest.raises(RuntimeError, match="memory measurement process failed"):
        measure_peak_memory(tmp_path, make_inputs, 1, "cpu")


def test_peak_memory_bad_method(model, make_inputs):
    with pytest.raises(KdbenchError, match="unknown method 'rss'; available: auto, cuda, forkserver"):
        measure_peak_memory(model, make_inputs, 1, "cpu", method="rss")
    with pytest.raises(KdbenchError, match="method 'cuda' needs a cuda device"):
        measure_peak_memory(model, make_inputs, 1, "cpu", method="cuda")
