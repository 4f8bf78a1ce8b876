"""Latency, generation latency, paired speedup and Timer on tiny models: fields and methods are sane. No timed
assertions: speed lives in benchmarks."""

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.profile import Timer, Timing, latency, measure_generation, measure_latency


def test_latency_fields(model, make_inputs):
    res = measure_latency(
        model, make_inputs, Timing(batch_sizes=(1, 4), warmup=1, min_repeats=2, max_repeats=3, time_budget_s=0.0)
    )
    assert sorted(res) == [1, 4]
    for bs, r in res.items():
        assert r["repeats"] == 2  # budget spent at once: stops at min_repeats
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["samples_per_s"] == pytest.approx(bs * 1e3 / r["median_ms"])
        assert r["num_threads"] == torch.get_num_threads()
        assert "time.perf_counter" in r["method"] and f"batch {bs}" in r["method"]


def test_latency_stops_at_max_repeats(model, make_inputs):
    res = measure_latency(model, make_inputs,
                          Timing(batch_sizes=(2,), warmup=0, min_repeats=1, max_repeats=3, time_budget_s=60))
    assert res[2]["repeats"] == 3


def test_latency_rejects_bad_repeats(model, make_inputs):
    with pytest.raises(KdbenchError, match="min_repeats"):
        measure_latency(model, make_inputs, Timing(min_repeats=5, max_repeats=2))


def test_generation_times_exactly_the_asked_new_tokens_per_call():
    """generate() is called with min = max new tokens (no early stop at an end token), greedy, and the figures
    per token follow from the median call."""
    from transformers import GPT2Config, GPT2LMHeadModel

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

    out = measure_generation(lm, prompt, Timing(batch_sizes=(1, 3), warmup=1, min_repeats=2, max_repeats=2,
                                                time_budget_s=0.01), new_tokens=5, pad_token_id=0)
    assert set(lengths) == {5} and len(lengths) == 2 * (1 + 2)  # warmup + timed calls, per batch size
    for bs, r in out.items():
        assert r["repeats"] == 2 and r["new_tokens"] == 5
        assert r["ms_per_token"] == pytest.approx(r["median_ms"] / 5)
        assert r["tokens_per_s"] == pytest.approx(bs * 5 * 1e3 / r["median_ms"])
        assert "model.generate(greedy, exactly 5 new tokens, KV cache)" in r["method"]


def test_speedup_is_the_median_of_paired_ratios(monkeypatch, model, make_inputs):
    """Timing is faked so the arithmetic is checked exactly: rounds alternate reference and model, and the
    speedup is the median of per-round ratios, not a ratio of two separately drifting medians."""
    reference = torch.nn.Identity()  # stands in for the teacher; never timed for real here
    times = iter([4.0, 1.0,  9.0, 3.0,  6.0, 1.0,  8.0, 4.0,  10.0, 2.0] * 4)  # (reference, model) per round
    calls = []

    def fake_time_call(m, batch, cuda):
        calls.append("ref" if m is reference else "model")
        return next(times)

    monkeypatch.setattr(latency, "_time_call", fake_time_call)
    out = latency.measure_speedup(model, reference, make_inputs, make_inputs,
                                  Timing(batch_sizes=(2,), warmup=0, min_repeats=5, max_repeats=5, time_budget_s=0.0))
    r = out[2]
    assert calls == ["ref", "model"] * 5
    assert r["rounds"] == 5
    assert r["speedup"] == pytest.approx(4.0)  # ratios 4, 3, 6, 2, 5 -> median 4
    assert r["model_ms"] == pytest.approx(2.0) and r["reference_ms"] == pytest.approx(8.0)
    assert "alternation" in r["method"]


def test_timer_counts_steps_and_samples():
    with Timer() as t:
        for _ in range(3):
            t.step(8)
    s = t.summary()
    assert s["steps"] == 3 and s["samples"] == 24 and s["wall_s"] > 0
    assert s["samples_per_s"] == pytest.approx(24 / s["wall_s"])
