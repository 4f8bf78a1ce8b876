"""Compressors on tiny causal LMs: Llama (multi-head and grouped-query attention) and GPT-2 (Conv1D projections).

Each model is built from a tiny config (hidden 64, 2 layers, 4 heads, vocab 100), never downloaded.
"""

import json

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from kdbench.compress import (
    apply_variant,
    example_inputs,
    frozen_sparsity,
    load_variant,
    save_variant,
)
from kdbench.compress.base import check_forward
from kdbench.compress.layout import conv1d_to_linear
from kdbench.errors import KdbenchError
from kdbench.introspect import count_parameters, is_quantized_tensor
from kdbench.profile import size_on_disk

VOCAB = 100


def tiny_llama(kv_heads=4, attn="sdpa"):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
        intermediate_size=128, attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(attn="sdpa"):
    torch.manual_seed(0)
    cfg = GPT2Config(  # n_inner unset: the FFN is 4 * 64 = 256 wide
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0,
        attn_implementation=attn,
    )
    return GPT2LMHeadModel(cfg).eval()


MODELS = {
    "llama": lambda attn="sdpa": tiny_llama(4, attn),  # one kv head per query head
    "llama-gqa": lambda attn="sdpa": tiny_llama(2, attn),  # 2 kv heads, each shared by 2 query heads
    "gpt2": tiny_gpt2,
}
ARCHS = list(MODELS)

# The projections inside one block, as prune_unstructured and int8 must find them.
PROJECTIONS = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
PROJECTIONS["llama-gqa"] = PROJECTIONS["llama"]


def blocks(model):
    return model.model.layers if isinstance(model, LlamaForCausalLM) else model.transformer.h


def logits(model, batch):
    with torch.inference_mode():
        return model(**batch).logits




@pytest.fixture(scope="module")
def batch():
    return example_inputs(tiny_llama(), "cpu", batch_size=3, seq_len=11)


# ---------------------------------------------------------------------------------------------------------------
# Inputs and the forward check


@pytest.mark.parametrize("arch", ARCHS)
def test_example_inputs_and_forward_check_on_causal_lms(arch, batch):
    model = MODELS[arch]()
    inputs = example_inputs(model, "cpu", batch_size=2, seq_len=5)
    assert set(inputs) == {"input_ids", "attention_mask"} and inputs["input_ids"].shape == (2, 5)
    assert int(inputs["input_ids"].max()) < VOCAB
    assert logits(model, batch).shape == (3, 11, VOCAB)
    check_forward(model, batch, "test", torch.device("cpu"))
    with torch.no_grad():
        blocks(model)[0].get_submodule(PROJECTIONS[arch][-1]).weight.fill_(float("inf"))
    with pytest.raises(KdbenchError, match="test on cpu: the forward pass gives non-finite outputs"):
        check_forward(model, batch, "test", torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------------
# Unstructured pruning and recovery


@pytest.mark.parametrize("arch", ARCHS)
def test_unstructured_pruning_prunes_block_projections_not_embeddings_or_lm_head(arch, batch):
    model = MODELS[arch]()
    pruned, info = apply_variant(model, [("prune_unstructured", {"amount": 0.5})], "cpu")
    step = info["steps"][0]
    assert step["pruned_layers"] == 2 * len(PROJECTIONS[arch])
    assert step["blocks"] == ("transformer.h" if arch == "gpt2" else "model.layers")
    assert step["sparsity"] == pytest.approx(0.5, abs=1e-3)
    for block in blocks(pruned):
        for name in PROJECTIONS[arch]:
            w = block.get_submodule(name).weight
            assert 0.05 < float((w == 0).float().mean()) < 0.95, name  # each projection really was pruned
    emb, head = pruned.get_input_embeddings(), pruned.get_output_embeddings()
    torch.testing.assert_close(emb.weight, model.get_input_embeddings().weight, rtol=0, atol=0)
    torch.testing.assert_close(head.weight, model.get_output_embeddings().weight, rtol=0, atol=0)
    if arch == "gpt2":
        assert head.weight is emb.weight  # still tied
    assert not any("_orig" in n or "_mask" in n for n, _ in pruned.named_parameters())
    out = logits(pruned, batch)
    assert torch.isfinite(out).all() and not torch.allclose(out, logits(model, batch))


def lm_steps(model, batch, steps=3, lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_recovery_keeps_pruned_weights_at_zero_then_quantizes(arch, batch, tmp_path):
    """The runner's recover flow: trainable steps, distillation steps under frozen_sparsity, then int8."""
    pruned, _ = apply_variant(MODELS[arch](), [("prune_structured", {"amount": 0.5}), ("prune_unstructured", {})],
                              "cpu")
    before = {n: p.detach().clone() for n, p in pruned.named_parameters()}
    prefix = "transformer.h" if arch == "gpt2" else "model.layers"
    pruned_weights = {f"{prefix}.{i}.{name}.weight" for i in range(2) for name in PROJECTIONS[arch]}
    zeros = {n: before[n] == 0 for n in pruned_weights}
    assert sum(int(z.sum()) for z in zeros.values()) > 1000
    with frozen_sparsity(pruned):
        lm_steps(pruned, batch)
    after = dict(pruned.named_parameters())
    assert set(after) == set(before)  # no masks left behind
    for n, z in zeros.items():
        assert not after[n][z].any(), f"{n}: a pruned weight came back"
        assert not torch.equal(after[n][~z], before[n][~z]), f"{n}: the surviving weights did not train"
    if arch == "gpt2":
        assert pruned.lm_head.weight is pruned.transformer.wte.weight

    quant, info = apply_variant(pruned, [("int8", {})], "cpu", copy_model=False)
    assert info["steps"][0]["quantized_linear"] >= 2 * len(PROJECTIONS[arch])
    out = logits(quant, batch)
    save_variant(quant, tmp_path)
    torch.testing.assert_close(logits(load_variant(tmp_path), batch), out)


def test_unstructured_pruning_of_a_model_without_layout_names_the_blocks_it_chose():
    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                   num_attention_heads=4, word_embed_proj_dim=32))
    _, info = apply_variant(opt, [("prune_unstructured", {})], "cpu")
    assert info["steps"][0]["blocks"] == "model.decoder.layers" and info["steps"][0]["pruned_layers"] == 6


# ---------------------------------------------------------------------------------------------------------------
# int8


def test_conv1d_to_linear_gives_the_same_outputs(batch):
    model = tiny_gpt2()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    ref = logits(model, batch)
    converted = tiny_gpt2()
    assert conv1d_to_linear(converted) == len(convs) == 8
    assert not any(isinstance(m, Conv1D) for m in converted.modules())
    x = torch.randn(3, 5, 256)
    for name, conv in convs.items():
        lin = converted.get_submodule(name)
        assert type(lin) is torch.nn.Linear and lin.weight.shape == conv.weight.shape[::-1]
        with torch.no_grad():
            torch.testing.assert_close(lin(x[..., : conv.nx]), conv(x[..., : conv.nx]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(converted, batch), ref, rtol=1e-6, atol=1e-6)


def assert_int8(weight, name):
    w = weight.detach()
    assert is_quantized_tensor(w), f"{name} is still {type(w).__name__}"
    inner = [getattr(w, n) for n in w.__tensor_flatten__()[0]]
    assert any(t.dtype == torch.int8 and t.shape == w.shape for t in inner), f"{name}: no int8 data inside"


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
@pytest.mark.parametrize("arch", ARCHS)
def test_int8_quantizes_every_projection(arch, mode, batch, tmp_path):
    model = MODELS[arch]()
    quant, info = apply_variant(model, [("int8", {"mode": mode, "backend": "torchao"})], "cpu")  # its subclasses
    step = info["steps"][0]
    if arch == "gpt2":  # 8 Conv1D made Linear; the tied lm_head stays float with the embeddings it shares
        assert (step["conv1d_to_linear"], step["quantized_linear"], step["float_linear"]) == (8, 8, ["lm_head"])
        assert quant.lm_head.weight is quant.transformer.wte.weight
    else:  # 14 projections and the (untied) lm_head
        assert (step["conv1d_to_linear"], step["quantized_linear"], step["float_linear"]) == (0, 15, [])
        assert_int8(quant.lm_head.weight, "lm_head")
    for i, block in enumerate(blocks(quant)):
        for name in PROJECTIONS[arch]:
            assert_int8(block.get_submodule(name).weight, f"block {i} {name}")

    ref, out = logits(model, batch), logits(quant, batch)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
    assert size_on_disk(quant)["bytes"] < 0.6 * size_on_disk(model)["bytes"]
    assert save_variant(quant, tmp_path)["format"] == "torch.save"
    torch.testing.assert_close(logits(load_variant(tmp_path), batch), out)


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_torch_dynamic_on_causal_lms(arch, batch):
    """PyTorch's dynamic int8 on GPT-2 (Conv1D made Linear first) and Llama: every projection packed, GPT-2's tied
    lm_head left float with its embeddings."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    model = MODELS[arch]()
    quant, info = apply_variant(model, [("int8", {"backend": "torch_dynamic"})], "cpu")
    step = info["steps"][0]
    expected = (8, 8, ["lm_head"]) if arch == "gpt2" else (0, 15, [])
    assert (step["conv1d_to_linear"], step["quantized_linear"], step["float_linear"]) == expected
    for block in blocks(quant):
        for name in PROJECTIONS[arch]:
            assert isinstance(block.get_submodule(name), DynamicLinear), name
    ref, out = logits(model, batch), logits(quant, batch)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


# ---------------------------------------------------------------------------------------------------------------
# fp16 / bf16


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("arch", ARCHS)
def test_casts_on_causal_lms(arch, name, dtype, batch):
    model = MODELS[arch]()
    half, info = apply_variant(model, [(name, {"allow_emulated": True})], "cpu")
    assert {p.dtype for p in half.parameters()} == {dtype}
    ref, out = logits(model, batch), logits(half, batch)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max() < 0.02 * ref.abs().max()
    if arch.startswith("llama"):  # rotary frequencies are derived, not weights: they stay float32, unrounded
        assert info["steps"][0]["float32_buffers"] == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
        torch.testing.assert_close(half.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Structured pruning

# head_amount 0.5, ffn_amount 0.25: what each model keeps per layer.
EXPECT = {  # heads, kv heads, heads per kv group, FFN width
    "llama": (2, 2, 1, 96),
    "llama-gqa": (2, 1, 2, 96),
    "gpt2": (2, 2, 1, 192),
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_structured_pruning_shrinks_causal_lms_and_round_trips(arch, attn, batch, tmp_path):
    model = MODELS[arch](attn)
    pruned, info = apply_variant(model, [("prune_structured", {"head_amount": 0.5, "ffn_amount": 0.25})], "cpu")
    step = info["steps"][0]
    heads, kv, group, ffn = EXPECT[arch]
    assert (step["heads_per_layer"], step["kv_heads_per_layer"], step["heads_per_kv_group"], step["ffn_width"]) == (
        heads, kv, group, ffn)
    assert step["heads_removed_per_layer"] == 2
    assert count_parameters(pruned)[0] == step["params_after"] < step["params_before"] == count_parameters(model)[0]
    assert size_on_disk(pruned)["bytes"] < 0.8 * size_on_disk(model)["bytes"]

    cfg, block = pruned.config, blocks(pruned)[1]
    assert cfg.num_attention_heads == heads and cfg.kdbench_attention_head_size == 16
    if arch == "gpt2":
        assert cfg.n_inner == ffn and cfg.kdbench_heads_before_pruning == {"n_head": 4}
        assert block.attn.c_attn.weight.shape == (64, 3 * heads * 16) and block.attn.c_attn.nf == 3 * heads * 16
        assert block.attn.c_proj.weight.shape == (heads * 16, 64) and block.mlp.c_fc.nf == ffn
        assert (block.attn.num_heads, block.attn.split_size) == (heads, heads * 16)
    else:
        assert cfg.num_key_value_heads == kv and cfg.intermediate_size == ffn and cfg.head_dim == 16
        assert cfg.kdbench_heads_before_pruning == {"num_attention_heads": 4, "num_key_value_heads": 4 // group}
        attn_ = block.self_attn
        assert attn_.q_proj.out_features == heads * 16 and attn_.k_proj.out_features == kv * 16
        assert attn_.o_proj.in_features == heads * 16 and attn_.num_key_value_groups == group
        assert block.mlp.gate_proj.out_features == block.mlp.down_proj.in_features == ffn
    out = logits(pruned, batch)
    assert out.shape == (3, 11, VOCAB) and torch.isfinite(out).all()

    assert save_variant(pruned, tmp_path)["format"] == "safetensors"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["n_head" if arch == "gpt2" else "num_attention_heads"] == heads  # the real, pruned counts
    loaded = load_variant(tmp_path)
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in pruned.parameters()]
    torch.testing.assert_close(logits(loaded, batch), out, rtol=1e-5, atol=1e-6)


def kill_units(model, arch):
    """Zero every weight of one head (Llama GQA: one kv group) and of a quarter of the FFN neurons in each block,
    so that they add nothing to the output and are the lowest-scoring units. Returns the kept query heads."""
    d, neurons = 16, slice(0, None, 4)
    with torch.no_grad():
        for block in blocks(model):
            if arch == "gpt2":
                a, mlp = block.attn, block.mlp
                for part in range(3):  # c_attn packs q, k, v, each 64 wide, head-major; Conv1D weight is (in, out)
                    a.c_attn.weight[:, part * 64 + 2 * d: part * 64 + 3 * d] = 0
                    a.c_attn.bias[part * 64 + 2 * d: part * 64 + 3 * d] = 0
                a.c_proj.weight[2 * d: 3 * d, :] = 0
                mlp.c_fc.weight[:, neurons] = 0
                mlp.c_fc.bias[neurons] = 0
                mlp.c_proj.weight[neurons, :] = 0
                kept = [0, 1, 3]
            else:
                a, mlp = block.self_attn, block.mlp
                if arch == "llama-gqa":  # kv head 1 and its query heads 2 and 3
                    a.q_proj.weight[2 * d: 4 * d] = 0
                    a.o_proj.weight[:, 2 * d: 4 * d] = 0
                    a.k_proj.weight[d: 2 * d] = a.v_proj.weight[d: 2 * d] = 0
                    kept = [0, 1]
                else:  # head 1
                    for lin in (a.q_proj, a.k_proj, a.v_proj):
                        lin.weight[d: 2 * d] = 0
                    a.o_proj.weight[:, d: 2 * d] = 0
                    kept = [0, 2, 3]
                mlp.gate_proj.weight[neurons] = mlp.up_proj.weight[neurons] = 0
                mlp.down_proj.weight[:, neurons] = 0
    return kept


@pytest.mark.parametrize("arch", ARCHS)
def test_structured_pruning_removes_exactly_the_dead_heads_and_neurons(arch, batch):
    """Units that contribute nothing score lowest and must be the ones cut: the logits do not move at all, and the
    surviving query rows are the original rows of the kept heads, in order."""
    model = MODELS[arch]()
    kept = kill_units(model, arch)
    ref = logits(model, batch)
    head_amount = 0.5 if arch == "llama-gqa" else 0.25  # one kv group of two / one head of four
    pruned, info = apply_variant(model, [("prune_structured", {"head_amount": head_amount, "ffn_amount": 0.25})],
                                 "cpu")
    assert info["steps"][0]["heads_per_layer"] == len(kept)
    torch.testing.assert_close(logits(pruned, batch), ref, rtol=1e-5, atol=1e-5)

    rows = torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in kept])
    for old, new in zip(blocks(model), blocks(pruned)):
        if arch == "gpt2":
            q_old, q_new = old.attn.c_attn.weight[:, :64], new.attn.c_attn.weight[:, : len(rows)]
            torch.testing.assert_close(q_new, q_old[:, rows], rtol=0, atol=0)
        else:
            torch.testing.assert_close(new.self_attn.q_proj.weight, old.self_attn.q_proj.weight[rows], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "steps",
    [
        [("prune_unstructured", {})],
        [("prune_structured", {})],  # amount 0.25: Llama keeps 3 of 4 heads, which its config validator refuses
        [("fp16", {"allow_emulated": True})],
        [("bf16", {"allow_emulated": True})],
        [("prune_structured", {"amount": 0.5}), ("int8", {})],
    ],
    ids=lambda steps: "+".join(name for name, _ in steps),
)
def test_every_variant_round_trips_through_save_and_load(arch, steps, batch, tmp_path):
    """int8 alone and head_amount 0.5 round-trip in their own tests above."""
    variant, _ = apply_variant(MODELS[arch](), steps, "cpu")
    out = logits(variant, batch)
    save_variant(variant, tmp_path)
    loaded = load_variant(tmp_path)
    assert type(loaded) is type(variant) and not loaded.training
    torch.testing.assert_close(logits(loaded, batch), out, rtol=1e-5, atol=1e-6)


def test_second_structured_pruning_loads_from_the_first_original(batch, tmp_path):
    once, _ = apply_variant(tiny_llama(2), [("prune_structured", {"head_amount": 0.5, "ffn_amount": 0.25})], "cpu")
    twice, info = apply_variant(once, [("prune_structured", {"head_amount": 0, "ffn_amount": 0.5})], "cpu")
    assert info["steps"][0]["ffn_width"] == 48 and twice.config.num_key_value_heads == 1
    assert twice.config.kdbench_heads_before_pruning == {"num_attention_heads": 4, "num_key_value_heads": 2}
    save_variant(twice, tmp_path)
    torch.testing.assert_close(logits(load_variant(tmp_path), batch), logits(twice, batch), rtol=1e-5, atol=1e-6)


def test_multi_query_attention_keeps_its_only_kv_group_and_says_so(caplog):
    with caplog.at_level("WARNING", logger="kdbench.compress"):
        pruned, info = apply_variant(tiny_llama(1), [("prune_structured", {"amount": 0.5})], "cpu")
    assert "prune_structured: no head removed from LlamaForCausalLM: round(1 kv groups x 0.5)" in caplog.text
    step = info["steps"][0]
    assert (step["heads_removed_per_layer"], step["heads_per_kv_group"], step["ffn_width"]) == (0, 4, 64)
    assert pruned.config.num_attention_heads == 4 and not hasattr(pruned.config, "kdbench_heads_before_pruning")
