"""Compressors on tiny BERT/DistilBERT configs: shapes, sparsity, sizes, save/load and user errors."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    OPTConfig,
    OPTForCausalLM,
)

from kdbench.compress import (
    apply_variant,
    compressors,
    example_inputs,
    load_variant,
    quantize,
    save_variant,
)
from kdbench.errors import KdbenchError
from kdbench.introspect import count_parameters
from kdbench.profile import size_on_disk


def tiny_bert(attn="sdpa"):
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        num_labels=3, attn_implementation=attn,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_distilbert(attn="sdpa"):
    torch.manual_seed(0)
    cfg = DistilBertConfig(
        vocab_size=500, dim=64, n_layers=2, n_heads=4, hidden_dim=128, num_labels=3, attn_implementation=attn
    )
    return DistilBertForSequenceClassification(cfg).eval()


MODELS = {"bert": tiny_bert, "distilbert": tiny_distilbert}


def logits(model, batch):
    with torch.inference_mode():
        return model(**batch).logits


@pytest.fixture(scope="module")
def batch():
    return example_inputs(tiny_bert(), "cpu", batch_size=3, seq_len=11)


def test_registry_lists_compressors():
    assert compressors.names() == ["bf16", "fp16", "int8", "prune_structured", "prune_unstructured"]
    assert compressors.describe("prune_structured").startswith("Remove whole attention heads")


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_structured_pruning_shrinks_and_round_trips(arch, attn, batch, tmp_path):
    model = MODELS[arch](attn)
    pruned, info = apply_variant(model, [("prune_structured", {"amount": 0.25, "head_amount": 0.5})], "cpu")
    step = info["steps"][0]
    assert step["heads_removed_per_layer"] == 2 and step["heads_per_layer"] == 2
    assert step["ffn_neurons_removed_per_layer"] == 32 and step["ffn_width"] == 96

    # Really smaller: fewer parameters, fewer bytes, and the caller's model is untouched.
    assert count_parameters(pruned)[0] == step["params_after"] < step["params_before"] == count_parameters(model)[0]
    assert size_on_disk(pruned)["bytes"] < 0.85 * size_on_disk(model)["bytes"]
    out = logits(pruned, batch)
    assert out.shape == (3, 3) and torch.isfinite(out).all()

    cfg = pruned.config
    heads_field, ffn_field = ("n_heads", "hidden_dim") if arch == "distilbert" else ("num_attention_heads", "intermediate_size")
    assert getattr(cfg, heads_field) == 2 and getattr(cfg, ffn_field) == 96
    assert cfg.kdbench_attention_head_size == 16  # head dim kept

    assert save_variant(pruned, tmp_path)["format"] == "safetensors"
    loaded = load_variant(tmp_path)
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in pruned.parameters()]
    torch.testing.assert_close(logits(loaded, batch), out, rtol=1e-5, atol=1e-6)


def test_ffn_only_pruning_loads_with_plain_from_pretrained(batch, tmp_path):
    pruned, info = apply_variant(tiny_bert(), [("prune_structured", {"amount": 0.5, "head_amount": 0})], "cpu")
    assert info["steps"][0]["heads_removed_per_layer"] == 0
    assert not hasattr(pruned.config, "kdbench_attention_head_size")
    pruned.save_pretrained(tmp_path)
    loaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.bert.encoder.layer[0].intermediate.dense.out_features == 64
    torch.testing.assert_close(logits(loaded, batch), logits(pruned, batch), rtol=1e-5, atol=1e-6)


def test_structured_pruning_keeps_the_most_important_head():
    model = tiny_bert()
    attn = model.bert.encoder.layer[0].attention.self
    with torch.no_grad():  # make head 2 of layer 0 by far the largest: it must survive
        for lin in (attn.query, attn.key, attn.value):
            lin.weight[32:48] *= 50
    pruned, _ = apply_variant(model, [("prune_structured", {"amount": 0.75})], "cpu")
    q = pruned.bert.encoder.layer[0].attention.self.query
    assert q.out_features == 16
    torch.testing.assert_close(q.weight, attn.query.weight[32:48])


def test_unstructured_pruning_sparsity_and_shapes(batch):
    model = tiny_bert()
    pruned, info = apply_variant(model, [("prune_unstructured", {"amount": 0.5})], "cpu")
    step = info["steps"][0]
    assert step["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert step["pruned_layers"] == 12  # 2 blocks x (q, k, v, out, ffn in, ffn out)
    total, nonzero = count_parameters(pruned)
    assert total == count_parameters(model)[0]  # same shapes
    assert nonzero < 0.8 * total
    # Embeddings and the classifier are left dense; no pruning masks are left behind.
    assert torch.equal(pruned.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
    assert torch.equal(pruned.bert.pooler.dense.weight, model.bert.pooler.dense.weight)
    assert torch.equal(pruned.classifier.weight, model.classifier.weight)
    assert not any("mask" in n or "orig" in n for n, _ in pruned.named_parameters())
    assert not any("mask" in n for n, _ in pruned.named_buffers())
    assert torch.isfinite(logits(pruned, batch)).all()


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_int8_runs_on_cpu_and_shrinks(mode, batch, tmp_path):
    model = tiny_bert()
    quant, info = apply_variant(model, [("int8", {"mode": mode})], "cpu")
    assert info["steps"][0]["quantized_linear"] == 14  # 12 in blocks + pooler + classifier
    ref, out = logits(model, batch), logits(quant, batch)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
    size = size_on_disk(quant)
    assert size["format"] == "torch.save"
    assert size["bytes"] < 0.8 * size_on_disk(model)["bytes"]
    assert count_parameters(quant)[0] == count_parameters(model)[0]  # logical elements

    assert save_variant(quant, tmp_path)["format"] == "torch.save"
    torch.testing.assert_close(logits(load_variant(tmp_path), batch), out)


def test_int8_torch_dynamic_backend_on_cpu(batch, tmp_path):
    """PyTorch's own dynamic int8 (packed weights, no parameters): the same outputs within int8 error, the same
    logical parameter count, a smaller file, a round trip, and pruning after it refused."""
    model = tiny_bert()
    quant, info = apply_variant(model, [("int8", {"backend": "torch_dynamic"})], "cpu")
    step = info["steps"][0]
    assert (step["backend"], step["quantized_linear"], step["float_linear"]) == ("torch_dynamic", 14, [])
    assert not any(type(m) is torch.nn.Linear for m in quant.modules())
    ref, out = logits(model, batch), logits(quant, batch)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3 and not torch.equal(out, ref)
    total, nonzero = count_parameters(quant)
    assert total == count_parameters(model)[0]  # the packed int8 weights count as the Linears they replace
    assert nonzero > 0.95 * total
    size = size_on_disk(quant)
    assert size["format"] == "torch.save" and size["bytes"] < 0.8 * size_on_disk(model)["bytes"]  # embeddings stay float
    assert save_variant(quant, tmp_path)["format"] == "torch.save"
    torch.testing.assert_close(logits(load_variant(tmp_path), batch), out)
    with pytest.raises(KdbenchError, match=r"^prune_unstructured: the model's Linears are already quantized"):
        apply_variant(quant, [("prune_unstructured", {})], "cpu")
    with pytest.raises(KdbenchError, match=r"^int8 backend torch_dynamic not supported on cuda: its kernels run"):
        compressors.get("int8")({"backend": "torch_dynamic"}).apply(tiny_bert(), device="cuda")
    with pytest.raises(KdbenchError, match=r"has mode dynamic only, not weight_only$"):
        apply_variant(model, [("int8", {"backend": "torch_dynamic", "mode": "weight_only"})], "cpu")
    # auto: the CPU's fast kernels for dynamic int8, torchao for weight-only
    assert apply_variant(model, [("int8", {"backend": "auto"})], "cpu")[1]["steps"][0]["backend"] == "torch_dynamic"
    assert apply_variant(model, [("int8", {"backend": "auto", "mode": "weight_only"})], "cpu")[1]["steps"][0][
        "backend"] == "torchao"


def test_prune_then_int8_and_order_is_enforced(batch):
    model = tiny_bert()
    both, info = apply_variant(model, [("prune_structured", {}), ("int8", {})], "cpu")
    assert [s["name"] for s in info["steps"]] == ["prune_structured", "int8"]
    assert logits(both, batch).shape == (3, 3)
    # the default int8 on a CPU (auto: PyTorch's dynamic int8), and torchao's tensor subclasses
    with pytest.raises(KdbenchError, match="prune_structured: the model's Linears are already quantized"):
        apply_variant(model, [("int8", {}), ("prune_structured", {})], "cpu")
    with pytest.raises(KdbenchError, match="prune_structured: weight .* is already quantized"):
        apply_variant(model, [("int8", {"backend": "torchao"}), ("prune_structured", {})], "cpu")


def test_bf16_halves_size(batch):
    model = tiny_bert()
    half, info = apply_variant(model, [("bf16", {"allow_emulated": True})], "cpu")
    assert info["steps"][0]["dtype"] == "bfloat16"
    assert next(half.parameters()).dtype == torch.bfloat16
    assert size_on_disk(half)["bytes"] == pytest.approx(size_on_disk(model)["bytes"] / 2, rel=0.01)
    assert logits(half, batch).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_cast_without_native_support_names_the_device(name, monkeypatch):
    monkeypatch.setattr(quantize, "native_dtype_support", lambda dtype, device: False)
    with pytest.raises(KdbenchError, match=f"{name} not supported on cpu: no native {name} matmul"):
        apply_variant(tiny_bert(), [(name, {})], "cpu")


def test_int8_on_unsupported_device_names_it():
    with pytest.raises(KdbenchError, match="int8 not supported on meta"):
        compressors.get("int8")({}).apply(tiny_bert(), device="meta")


@pytest.mark.parametrize(
    "name, params, field",
    [
        ("prune_structured", {"amount": 0.0}, "amount"),
        ("prune_structured", {"amount": 1.0}, "amount"),
        ("prune_structured", {"head_amount": 1.2}, "head_amount"),
        ("prune_structured", {"ffn_amount": -0.1}, "ffn_amount"),
        ("prune_unstructured", {"amount": 1.5}, "amount"),
        ("prune_unstructured", {"sparsity": 0.5}, "sparsity"),
        ("int8", {"mode": "int4"}, "mode"),
    ],
)
def test_invalid_params_name_compressor_and_field(name, params, field):
    with pytest.raises(KdbenchError, match=rf"compressor '{name}': params\.{field}"):
        apply_variant(tiny_bert(), [("prune_unstructured", {}), (name, params)], "cpu")


def test_unknown_compressor_lists_available():
    with pytest.raises(KdbenchError, match="unknown compressor 'int3'; available: bf16, fp16, int8"):
        apply_variant(tiny_bert(), [("int3", {})], "cpu")


def test_unsupported_architecture_names_the_model_class_and_type():
    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                   num_attention_heads=4, word_embed_proj_dim=32))
    with pytest.raises(KdbenchError, match="cannot prune OPTForCausalLM: no head/FFN layout known for model_type 'opt'"):
        apply_variant(opt, [("prune_structured", {})], "cpu")


def test_layout_that_does_not_match_the_model_raises_kdbench_error():
    model = tiny_bert()
    model.bert.encoder.layer[1].attention.self.key = torch.nn.Identity()  # no weight where the layout expects one
    with pytest.raises(KdbenchError, match="prune_structured: cannot prune BertForSequenceClassification with the "
                                           "'bert' layout: AttributeError"):
        apply_variant(model, [("prune_structured", {})], "cpu")


def test_structured_pruning_under_inference_mode_keeps_requires_grad():
    model = tiny_bert()
    model.bert.embeddings.requires_grad_(False)
    model.bert.encoder.layer[0].requires_grad_(False)  # frozen, and it gets pruned
    with torch.inference_mode():
        pruned, _ = apply_variant(model, [("prune_structured", {})], "cpu")
    expect = {n: t.requires_grad for n, t in model.named_parameters()}
    assert {n: t.requires_grad for n, t in pruned.named_parameters()} == expect
