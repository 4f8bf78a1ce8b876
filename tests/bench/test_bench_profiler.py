"""pytest-benchmark checks for the profiler's own overhead, group "profiler": each also asserts its figures.

The model here is nearly free to run, so the timings are what the profiler itself costs per call.
pyproject's addopts (--benchmark-disable --benchmark-skip) skips these in every run unless they are cleared:
CI smoke run (each benchmark runs once, untimed):  pytest tests/bench -o addopts="" --benchmark-disable
Timed run:                                         pytest tests/bench -o addopts="" -k profiler
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdbench.introspect import count_parameters, tensor_bytes
from kdbench.profile import Timing, measure_latency, measure_peak_memory, size_on_disk, start_memory_server


class Free(torch.nn.Module):
    """One tiny op per call: what remains of measure_latency's time is its own overhead."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))

    def forward(self, input_ids, attention_mask=None):
        return input_ids.float()[..., :4] * self.w


def make_inputs(batch_size):
    ids = torch.randint(1, 500, (batch_size, 16), generator=torch.Generator().manual_seed(batch_size))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.benchmark(group="profiler")
def test_latency_overhead(benchmark):
    res = benchmark(
        measure_latency, Free(), make_inputs, Timing(batch_sizes=(1, 8), warmup=1, min_repeats=20, max_repeats=20,
                                                     time_budget_s=0.0),
    )
    assert [r["repeats"] for r in res.values()] == [20, 20]
    assert all(0 < r["median_ms"] <= r["p90_ms"] for r in res.values())


@pytest.mark.benchmark(group="profiler")
def test_count_parameters(benchmark, bert):
    total, nonzero = benchmark(count_parameters, bert)
    assert total == sum(p.numel() for p in bert.parameters()) and 0 < nonzero <= total


@pytest.mark.benchmark(group="profiler")
def test_size_on_disk(benchmark, bert):
    res = benchmark(size_on_disk, bert)
    assert res["format"] == "safetensors" and res["bytes"] == pytest.approx(tensor_bytes(bert), rel=0.05)


@pytest.mark.benchmark(group="profiler")
def test_peak_memory_inprocess(benchmark, bert):
    res = benchmark(measure_peak_memory, bert, make_inputs, 8, "cpu", method="inprocess")
    assert res["peak_mb"] >= res["weights_mb"] > 0


@pytest.mark.benchmark(group="profiler")
def test_peak_memory_forkserver_warm(benchmark, bert):
    start_memory_server()
    measure_peak_memory(bert, make_inputs, 8, "cpu", method="forkserver")  # wait for the server: not timed
    res = benchmark.pedantic(
        measure_peak_memory, args=(bert, make_inputs, 8, "cpu"), kwargs={"method": "forkserver"}, rounds=3
    )
    assert res["peak_mb"] > 0 and res["resident_mb"] > 0


@pytest.mark.benchmark(group="profiler")
def test_peak_memory_fresh_subprocess(benchmark, bert):
    # Seconds per call (the child imports torch and transformers): the reason "forkserver" is the CPU default.
    res = benchmark.pedantic(
        measure_peak_memory, args=(bert, make_inputs, 8, "cpu"), kwargs={"method": "subprocess"}, rounds=1
    )
    assert res["method"].startswith("subprocess: peak RSS") and res["peak_mb"] > 0
