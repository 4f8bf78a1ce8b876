"""pytest-benchmark checks for the compressors, group "compress": each also asserts what the compressor did.

pyproject's addopts (--benchmark-disable --benchmark-skip) skips these in every run unless they are cleared:
CI smoke run (each benchmark runs once, untimed):  pytest tests/bench -o addopts="" --benchmark-disable
Timed run:                                         pytest tests/bench -o addopts="" -k compress
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdbench.compress import apply_variant, example_inputs
from kdbench.introspect import count_parameters


@pytest.fixture(scope="module")
def model():
    # Wide enough that compression work, not Python overhead, dominates; small enough for the 2-core box.
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def batch(model):
    return example_inputs(model, "cpu", batch_size=2, seq_len=16)


def _run(benchmark, model, steps):
    # copy_model=True (the default) is part of the cost a runner pays per variant.
    return benchmark.pedantic(apply_variant, args=(model, steps, "cpu"), rounds=3, iterations=1, warmup_rounds=0)


@pytest.mark.benchmark(group="compress")
def test_prune_unstructured(benchmark, model, batch):
    pruned, info = _run(benchmark, model, [("prune_unstructured", {"amount": 0.5})])
    assert info["steps"][0]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert torch.isfinite(pruned(**batch).logits).all()


@pytest.mark.benchmark(group="compress")
def test_prune_structured(benchmark, model, batch):
    pruned, info = _run(benchmark, model, [("prune_structured", {"amount": 0.5})])
    step = info["steps"][0]
    assert step["heads_per_layer"] == 2 and step["ffn_width"] == 256
    assert count_parameters(pruned)[0] == step["params_after"] < step["params_before"]
    assert pruned(**batch).logits.shape == (2, 2)


@pytest.mark.benchmark(group="compress")
@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_int8(benchmark, model, batch, mode):
    quant, info = _run(benchmark, model, [("int8", {"mode": mode})])
    assert info["steps"][0]["quantized_linear"] == 14  # 2 blocks x 6, pooler, classifier
    with torch.inference_mode():
        ref, out = model(**batch).logits, quant(**batch).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


@pytest.mark.benchmark(group="compress")
def test_bf16(benchmark, model, batch):
    half, info = _run(benchmark, model, [("bf16", {"allow_emulated": True})])
    assert info["steps"][0]["dtype"] == "bfloat16"
    with torch.inference_mode():
        ref, out = model(**batch).logits, half(**batch).logits.float()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-2
