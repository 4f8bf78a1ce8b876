"""size_on_disk: the saved weights' bytes and format, dense and quantized."""

from kdbench.compress import apply_variant
from kdbench.profile import size_on_disk


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
