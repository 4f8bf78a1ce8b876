"""Profiler on tiny models: fields and methods are sane. No timed assertions: speed lives in benchmarks."""

import pytest
import torch

from kdbench.profiler import (
    Timer,
    count_parameters,
    measure_energy,
    measure_latency,
    measure_peak_memory,
    size_on_disk,
    start_memory_server,
    tensor_bytes,
)

# The memory fork server imports torch + transformers (seconds): start it at collection, in the background,
# so it is ready by the time the memory tests (last in this file) run.
start_memory_server()

from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from kdbench.compress import apply_variant, save_variant  # noqa: E402
from kdbench.errors import KdbenchError  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return BertForSequenceClassification(cfg).eval()


def make_inputs(batch_size):
    g = torch.Generator().manual_seed(batch_size)
    ids = torch.randint(1, 500, (batch_size, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_count_parameters_dense_sparse_and_quantized(model):
    total, nonzero = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert 0.95 * total < nonzero <= total  # a few zeros: the padding embedding row
    sparse, _ = apply_variant(model, [("prune_unstructured", {"amount": 0.5})], "cpu")
    assert count_parameters(sparse)[0] == total and count_parameters(sparse)[1] < 0.8 * total
    quant, _ = apply_variant(sparse, [("int8", {"mode": "weight_only"})], "cpu")
    q_total, q_nonzero = count_parameters(quant)
    assert q_total == total  # logical elements, not int8 bytes or scales
    assert q_nonzero == pytest.approx(count_parameters(sparse)[1], rel=0.01)  # zeros stay zero in int8


def test_size_on_disk_formats(model):
    dense = size_on_disk(model)
    assert dense["format"] == "safetensors"
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert param_bytes < dense["bytes"] < param_bytes + 16_000  # + the JSON header; non-persistent buffers left out
    assert dense["mb"] == dense["bytes"] / 2**20 and "safetensors" in dense["method"]
    quant, _ = apply_variant(model, [("int8", {})], "cpu")
    q = size_on_disk(quant)
    assert q["format"] == "torch.save" and "not safetensors-serialisable" in q["method"]
    assert 0 < q["bytes"] < dense["bytes"]


def test_latency_fields(model):
    res = measure_latency(
        model, make_inputs, batch_sizes=(1, 4), warmup=1, min_repeats=2, max_repeats=3, time_budget_s=0.0
    )
    assert sorted(res) == [1, 4]
    for bs, r in res.items():
        assert r["repeats"] == 2  # budget spent at once: stops at min_repeats
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["samples_per_s"] == pytest.approx(bs * 1e3 / r["median_ms"])
        assert r["num_threads"] == torch.get_num_threads()
        assert "time.perf_counter" in r["method"] and f"batch {bs}" in r["method"]


def test_latency_stops_at_max_repeats(model):
    res = measure_latency(model, make_inputs, batch_sizes=(2,), warmup=0, min_repeats=1, max_repeats=3, time_budget_s=60)
    assert res[2]["repeats"] == 3


def test_latency_rejects_bad_repeats(model):
    with pytest.raises(KdbenchError, match="min_repeats"):
        measure_latency(model, make_inputs, min_repeats=5, max_repeats=2)


def test_generation_times_exactly_the_asked_new_tokens_per_call():
    """generate() is called with min = max new tokens (no early stop at an end token), greedy, and the figures
    per token follow from the median call."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdbench.profiler import measure_generation

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=64)).eval()
    lengths = []
    real_generate = lm.generate

    def generate(**kwargs):
        out = real_generate(**kwargs)
        lengths.append(out.shape[-1] - kwargs["input_ids"].shape[-1])
        return out

    lm.generate = generate
    def prompt(bs):
        return {"input_ids": torch.randint(1, 50, (bs, 8)), "attention_mask": torch.ones(bs, 8, dtype=int)}

    out = measure_generation(lm, prompt, new_tokens=5, pad_token_id=0, batch_sizes=(1, 3), warmup=1,
                             min_repeats=2, max_repeats=2, time_budget_s=0.01)
    assert set(lengths) == {5} and len(lengths) == 2 * (1 + 2)  # warmup + timed calls, per batch size
    for bs, r in out.items():
        assert r["repeats"] == 2 and r["new_tokens"] == 5
        assert r["ms_per_token"] == pytest.approx(r["median_ms"] / 5)
        assert r["tokens_per_s"] == pytest.approx(bs * 5 * 1e3 / r["median_ms"])
        assert "model.generate(greedy, exactly 5 new tokens, KV cache)" in r["method"]


def test_energy_is_none_on_cpu(model):
    res = measure_energy(model, make_inputs, 2, "cpu")
    assert res["joules_per_sample"] is None and res["method"].startswith("n/a")


def test_timer_counts_steps_and_samples():
    with Timer() as t:
        for _ in range(3):
            t.step(8)
    s = t.summary()
    assert s["steps"] == 3 and s["samples"] == 24 and s["wall_s"] > 0
    assert s["samples_per_s"] == pytest.approx(24 / s["wall_s"])


# Memory last: the fork server started by the fixture has had time to import.


def test_peak_memory_forkserver_from_model_and_from_dir(model, tmp_path):
    # One fork server serves both calls; the first call pays for its start.
    res = measure_peak_memory(model, make_inputs, 8, "cpu")
    assert res["method"].startswith("forkserver: peak RSS")
    assert res["peak_mb"] > 0 and res["resident_mb"] > 0 and res["baseline_mb"] > 100
    assert res["weights_mb"] == pytest.approx(tensor_bytes(model) / 2**20)

    quant, _ = apply_variant(model, [("int8", {})], "cpu")
    save_variant(quant, tmp_path)
    res = measure_peak_memory(tmp_path, make_inputs, 8, "cpu", method="forkserver")
    assert res["peak_mb"] > 0 and res["weights_mb"] < tensor_bytes(model) / 2**20


def test_peak_memory_inprocess_counts_weights_at_least(model):
    res = measure_peak_memory(model, make_inputs, 8, "cpu", method="inprocess")
    assert res["peak_mb"] >= res["weights_mb"] == pytest.approx(tensor_bytes(model) / 2**20)
    assert res["method"].startswith("inprocess")


def test_peak_memory_child_error_is_reported(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # not a model
    with pytest.raises(RuntimeError, match="memory measurement process failed"):
        measure_peak_memory(tmp_path, make_inputs, 1, "cpu")


def test_peak_memory_bad_method(model):
    with pytest.raises(KdbenchError, match="unknown method 'rss'; available: auto, cuda, forkserver"):
        measure_peak_memory(model, make_inputs, 1, "cpu", method="rss")
    with pytest.raises(KdbenchError, match="method 'cuda' needs a cuda device"):
        measure_peak_memory(model, make_inputs, 1, "cpu", method="cuda")


def test_speedup_is_the_median_of_paired_ratios(monkeypatch, model):
    """Timing is faked so the arithmetic is checked exactly: rounds alternate reference and model, and the
    speedup is the median of per-round ratios, not a ratio of two separately drifting medians."""
    from kdbench import profiler

    reference = torch.nn.Identity()  # stands in for the teacher; never timed for real here
    times = iter([4.0, 1.0,  9.0, 3.0,  6.0, 1.0,  8.0, 4.0,  10.0, 2.0] * 4)  # (reference, model) per round
    calls = []

    def fake_time_call(m, batch, cuda):
        calls.append("ref" if m is reference else "model")
        return next(times)

    monkeypatch.setattr(profiler, "_time_call", fake_time_call)
    out = profiler.measure_speedup(model, reference, make_inputs, make_inputs, batch_sizes=(2,), warmup=0,
                                   min_repeats=5, max_repeats=5, time_budget_s=0.0)
    r = out[2]
    assert calls == ["ref", "model"] * 5
    assert r["rounds"] == 5
    assert r["speedup"] == pytest.approx(4.0)  # ratios 4, 3, 6, 2, 5 -> median 4
    assert r["model_ms"] == pytest.approx(2.0) and r["reference_ms"] == pytest.approx(8.0)
    assert "alternation" in r["method"]
