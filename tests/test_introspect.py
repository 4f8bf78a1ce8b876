"""kdbench.introspect: what a model holds, counted the same for dense, sparse and quantized weights."""

from types import SimpleNamespace

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5Model,
)

from kdbench.compress import apply_variant
from kdbench.errors import KdbenchError
from kdbench.introspect import count_parameters, stack_blocks, stack_parameters, transformer_blocks


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return BertForSequenceClassification(cfg).eval()


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


# ---------------------------------------------------------------------------------------------------------------
# Layer stacks and transformer blocks, as the intermediate-layer methods find and freeze them


def names_of(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def tiny_bert():
    return BertForSequenceClassification(BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16))


def tiny_distilbert():
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=40, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16))


def tiny_roberta():
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=20))


def tiny_gpt2():
    return GPT2ForSequenceClassification(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16))


def under(names: set[str], modules: set[str]) -> bool:
    """Every name lies under one of `modules`, and every module holds one of the names."""
    owner = {n: [m for m in modules if n.startswith(m + ".")] for n in names}
    return all(owner.values()) and {m for ms in owner.values() for m in ms} == modules


@pytest.mark.parametrize("make, blocks, before, after", [
    (tiny_bert, "bert.encoder.layer", {"bert.embeddings"}, {"bert.pooler", "classifier"}),
    (tiny_roberta, "roberta.encoder.layer", {"roberta.embeddings"}, {"classifier"}),
    (tiny_distilbert, "distilbert.transformer.layer", {"distilbert.embeddings"}, {"pre_classifier", "classifier"}),
    (tiny_gpt2, "transformer.h", {"transformer.wte", "transformer.wpe"}, {"transformer.ln_f", "score"}),
])
def test_transformer_blocks_are_found_in_encoders_and_decoders(make, blocks, before, after):
    model = make()
    name, found = transformer_blocks(model)
    assert name == blocks and len(found) == 2
    first, per_stack, last = stack_parameters(model)
    per_block = per_stack[""]
    assert under(names_of(model, first), before) and under(names_of(model, last), after)
    assert [under(names_of(model, p), {f"{blocks}.{i}"}) for i, p in enumerate(per_block)] == [True, True]
    assert len(first) + sum(map(len, per_block)) + len(last) == len(list(model.parameters()))


def test_progressive_fails_at_setup_naming_a_model_whose_blocks_it_cannot_find():
    t5 = T5Model(T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                          decoder_start_token_id=0))
    # one stack's finder sees T5's two; the stacks' finder takes each under its own stack
    with pytest.raises(KdbenchError, match=r"cannot find the transformer blocks of the 't5' student \(one ModuleList "
                                           r"of its 2 layers; found 2: encoder.block, decoder.block\)$"):
        transformer_blocks(t5)
    assert {k: v is getattr(t5, k).block for k, v in stack_blocks(t5).items()} == {"encoder": True, "decoder": True}

    class Mystery(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=2, hidden_size=8, model_type="mystery")
            self.mix = torch.nn.Linear(8, 8)

    with pytest.raises(KdbenchError, match=r"the 'mystery' student \(one ModuleList of its 2 layers; found none\)$"):
        transformer_blocks(Mystery())
    seq2seq = Mystery()
    seq2seq.config.is_encoder_decoder = True
    with pytest.raises(KdbenchError, match=r"^method 'progressive': cannot find the encoder blocks of the 'mystery' "
                                           r"student \(one ModuleList of its 2 encoder layers; found none\)$"):
        stack_blocks(seq2seq)
