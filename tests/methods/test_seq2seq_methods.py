"""Methods on encoder-decoder pairs: the layer methods (hidden, attention, progressive) map each T5 stack to the
teacher's stack of the same kind, progressive finds BART's layers, and sequence-level KD's defaults."""

import math
from types import SimpleNamespace

import pytest
import torch

from kdbench import heads, models
from kdbench.errors import KdbenchError
from kdbench.heads import IGNORE
from kdbench.kernels import kd_loss
from kdbench.methods import make_objective
from kdbench.methods.sequence import SequenceKD
from kdbench.suite import TrainingSettings
from kdbench.tasks import load_task
from kdbench.train.distiller import Distiller
from kdbench.train.loop import training_arguments
from tiny import save_tiny_bart_pair
from tiny import tiny_t5 as t5


@pytest.fixture(scope="module")
def data():
    return load_task("generated_seq2seq", {"train_size": 40, "eval_size": 12})


@pytest.fixture(scope="module")
def tok(data, tmp_path_factory):
    return models.train_tokenizer(heads.get("seq2seq").texts(data.train), 300, tmp_path_factory.mktemp("tok"))


def t5_pair(tok):
    """(student, teacher): encoder 2 -> 4 layers, decoder 1 -> 2, d_model 16 -> 32, heads 2 -> 4; no dropout."""
    teacher = t5(tok, seed=1, d_model=32, d_ff=64, num_layers=4, num_decoder_layers=2, num_heads=4, dropout_rate=0.0)
    student = t5(tok, seed=2, num_layers=2, num_decoder_layers=1, dropout_rate=0.0)
    return student, teacher


def test_layer_methods_map_each_t5_stack_to_the_teachers_stack_of_the_same_kind(tok):
    student, teacher = t5_pair(tok)
    hidden, attention = make_objective("hidden", {}), make_objective("attention", {})
    hidden.setup(student, teacher)
    attention.setup(student, teacher)
    assert hidden.layer_maps == {"encoder": {0: 0, 1: 2, 2: 4}, "decoder": {0: 0, 1: 2}}
    assert attention.layer_maps == {"encoder": {1: 2, 2: 4}, "decoder": {1: 2}}
    assert hidden.layer_map == {0: 0, 1: 2, 2: 4} and hidden.decoder_layer_map == {0: 0, 1: 2}
    assert {k: (m.in_features, m.out_features) for k, m in hidden.modules.items()} == {
        "encoder_0": (16, 32), "encoder_1": (16, 32), "encoder_2": (16, 32), "decoder_0": (16, 32),
        "decoder_1": (16, 32)}  # one projection per mapped index per stack, d_model -> teacher d_model
    # num_decoder_layers left out: the decoder has num_layers layers, as in T5Config
    default = make_objective("attention", {})
    default.setup(t5(tok, num_layers=2), t5(tok, num_layers=3))
    assert default.layer_maps == {"encoder": {1: 2, 2: 3}, "decoder": {1: 2, 2: 3}}

    # a user's layer_map applies to both stacks; decoder_layer_map gives the decoder its own
    both = make_objective("attention", {"layer_map": {1: 2}})
    both.setup(student, teacher)
    assert both.layer_maps == {"encoder": {1: 2}, "decoder": {1: 2}}
    own = make_objective("hidden", {"layer_map": {2: 4}, "decoder_layer_map": {1: 1, 0: 0}})
    own.setup(student, teacher)
    assert own.layer_maps == {"encoder": {2: 4}, "decoder": {0: 0, 1: 1}}
    assert list(own.modules) == ["encoder_2", "decoder_0", "decoder_1"]


@pytest.mark.parametrize("method, params, message", [
    ("hidden", {"layer_map": {2: 4}}, ("params.layer_map: student index 2 is out of range (the student's decoder "
                                       "has 1 layer: hidden-state indices 0..1, 0 = embeddings)")),
    ("attention", {"layer_map": {3: 1}}, ("params.layer_map: student index 3 is out of range (the student's "
                                          "encoder has 2 layers: layers 1..2)")),
    ("attention", {"decoder_layer_map": {1: 3}}, ("params.decoder_layer_map: teacher index 3 is out of range "
                                                  "(the teacher's decoder has 2 layers: layers 1..2)")),
    ("hidden", {"decoder_layer_map": {}}, "params.decoder_layer_map is empty; leave it out for the uniform map"),
    ("progressive", {"decoder_layer_map": {2: 1}}, ("params.decoder_layer_map: student index 2 is out of range "
                                                    "(the student's decoder has 1 layer: layers 1..1)")),
])
def test_a_bad_t5_layer_map_fails_at_setup_in_one_line_naming_the_stack(tok, method, params, message):
    with pytest.raises(KdbenchError) as info:
        make_objective(method, params).setup(*t5_pair(tok))
    assert str(info.value) == f"method {method!r}: {message}"


def test_layer_methods_refuse_a_mixed_pair_and_a_decoder_map_without_a_decoder(tok):
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32))
    with pytest.raises(KdbenchError, match=r"^method 'hidden': the student is an encoder-decoder and the teacher is "
                                           r"not; layer maps pair stacks of the same kind, use the logit method$"):
        make_objective("hidden", {}).setup(t5(tok), bert)
    with pytest.raises(KdbenchError, match=r"^method 'attention': the teacher is an encoder-decoder and the student"):
        make_objective("attention", {}).setup(bert, t5(tok))
    with pytest.raises(KdbenchError, match=r"^method 'attention': params.decoder_layer_map is for encoder-decoder "
                                           r"pairs \(T5\); this pair has one layer stack, use params.layer_map$"):
        make_objective("attention", {"decoder_layer_map": {1: 1}}).setup(bert, bert)


def seq2seq_batch(data, tok, n: int = 4) -> dict:
    head = heads.get("seq2seq")
    batch = head.collator(tok)(head.encode(data.train[:n], tok, 32))
    assert not batch["attention_mask"].all() and not (batch["labels"] != IGNORE).all()  # padding on both sides
    return batch


def t5_distiller(student, teacher, objective, tmp_path):
    args = training_arguments(TrainingSettings(), seed=0, device="cpu", output_dir=str(tmp_path))
    return Distiller(model=student, args=args, teacher=teacher, objective=objective, head=heads.get("seq2seq"))


def t5_outputs(model, batch, objective):
    return model(**models.model_inputs(batch, model), output_hidden_states=objective.needs_hidden_states,
                 output_attentions=objective.needs_attentions)


def test_hidden_on_t5_is_kd_loss_with_both_stacks_real_tokens_and_trains_student_and_projections(data, tok, tmp_path):
    from kdbench.methods.hidden import HiddenParams, HiddenStateKD

    student, teacher = t5_pair(tok)
    objective = HiddenStateKD(HiddenParams(temperature=2.0, alpha=0.6, feature_weight=0.5))
    d = t5_distiller(student, teacher, objective, tmp_path)
    batch = seq2seq_batch(data, tok)
    loss = d.compute_loss(student, dict(batch))
    assert math.isfinite(loss.item()) and loss.item() > 0

    # by hand: the encoder's real source tokens, then the decoder's labelled target positions, through the projections
    with torch.no_grad():
        so, to = t5_outputs(student, batch, objective), t5_outputs(teacher, batch, objective)
        fs, ft = [], []
        for stack, keep in (("encoder", batch["attention_mask"].bool()), ("decoder", batch["labels"] != IGNORE)):
            s_hidden, t_hidden = getattr(so, f"{stack}_hidden_states"), getattr(to, f"{stack}_hidden_states")
            for s, t in objective.layer_maps[stack].items():
                fs.append(objective.modules[f"{stack}_{s}"](s_hidden[s][keep]))
                ft.append(t_hidden[t][keep])
        fs, ft = torch.cat(fs), torch.cat(ft)
        rows = 3 * int(batch["attention_mask"].sum()) + 2 * int((batch["labels"] != IGNORE).sum())
        assert fs.shape == ft.shape == (rows, 32)
        expected = kd_loss(so.logits, to.logits, batch["labels"], temperature=2.0, alpha=0.6, student_features=fs,
                           teacher_features=ft, feature_weight=0.5)
        logit_only = kd_loss(so.logits, to.logits, batch["labels"], temperature=2.0, alpha=0.6)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert loss.item() > logit_only.item()

    loss.backward()
    for name, p in objective.modules.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for stack in (student.encoder, student.decoder):
        assert stack.block[0].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0
    assert student.encoder.block[1].layer[-1].DenseReluDense.wo.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def with_other_padding(batch: dict, tok, seed: int) -> dict:
    """The batch with other token ids at its padded source positions and its unlabelled decoder positions."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in batch.items()}
    for key, pad in (("input_ids", batch["attention_mask"] == 0), ("decoder_input_ids", batch["labels"] == IGNORE)):
        out[key][pad] = torch.randint(5, len(tok), (int(pad.sum()),), generator=g)
    return out


@pytest.mark.parametrize("method", ["hidden", "attention"])
def test_layer_methods_on_t5_leave_out_source_and_target_padding(data, tok, tmp_path, monkeypatch, method):
    from kdbench import kernels
    from kdbench.train.distiller import objective_attached

    calls = []

    def spy(*args, **kwargs):  # the one kd_loss call of a loss: record its features
        calls.append((kwargs["student_features"], kwargs["teacher_features"]))
        return real(*args, **kwargs)

    real = kernels.kd_loss
    monkeypatch.setattr(kernels, "kd_loss", spy)
    student, teacher = t5_pair(tok)
    objective = make_objective(method, {})
    d = t5_distiller(student, teacher, objective, tmp_path)
    batch = seq2seq_batch(data, tok)
    other = with_other_padding(batch, tok, seed=0)
    source, target = batch["attention_mask"], batch["labels"] != IGNORE

    def features(inputs, **masks):
        calls.clear()
        so, to = t5_outputs(student, inputs, objective), t5_outputs(teacher, inputs, objective)
        loss = objective.loss(so, to, inputs["labels"], **masks)
        [(fs, ft)] = calls
        return loss, fs, ft

    with objective_attached(student, teacher, objective), torch.no_grad():
        loss = d.compute_loss(student, dict(batch))
        [masked] = calls
        assert d.compute_loss(student, dict(other)).item() == loss.item()  # other padding: the same loss
        assert all(torch.equal(a, b) for a, b in zip(calls[-1], masked))  # ... from the same features
        both = features(batch, attention_mask=source, decoder_attention_mask=target)
        assert both[0].item() == loss.item() and all(torch.equal(a, b) for a, b in zip(both[1:], masked))
        # Each stack's mask is what keeps the padding out: without it, the padded positions' features change.
        for masks in ({"attention_mask": source}, {"decoder_attention_mask": target}):
            _, fs, ft = features(batch, **masks)
            _, fs_other, ft_other = features(other, **masks)
            assert fs.shape[0] > masked[0].shape[0] and not torch.equal(fs, fs_other), masks
            assert not torch.equal(ft, ft_other), masks


def test_attention_on_t5_matches_encoder_decoder_and_cross_maps_at_real_entries(data, tok):
    from kdbench.methods.attention import AttentionKD, AttentionParams
    from kdbench.train.distiller import objective_attached

    student, teacher = t5_pair(tok)
    batch = seq2seq_batch(data, tok)
    source, target = batch["attention_mask"], batch["labels"] != IGNORE
    ns, nt = source.sum(1), target.sum(1)
    for cross in (True, False):
        objective = AttentionKD(AttentionParams(cross_attention=cross))
        objective.setup(student, teacher)  # encoder {1: 2, 2: 4}, decoder {1: 2}; heads 2 vs 4, averaged
        with objective_attached(student, teacher, objective), torch.no_grad():
            so, to = t5_outputs(student, batch, objective), t5_outputs(teacher, batch, objective)
        fs, ft = objective.stack_features(so, to, source, target)
        encoder = 2 * int((ns * ns).sum())  # 2 pairs, real query x real key
        decoder = int((nt * (nt + 1) // 2).sum())  # 1 pair, real query x real key at or before it
        assert fs.shape == ft.shape == (encoder + decoder + cross * int((nt * ns).sum()), 1)
    # the encoder's first pair (student layer 1, teacher layer 2), sequence 0; the decoder's, its last sequence
    n, m = int(ns[0]), int(nt[-1])
    torch.testing.assert_close(fs[: n * n, 0], so.encoder_attentions[0][0].mean(0)[:n, :n].flatten())
    torch.testing.assert_close(ft[: n * n, 0], to.encoder_attentions[1][0].mean(0)[:n, :n].flatten())
    causal = torch.ones(m, m, dtype=torch.bool).tril()
    torch.testing.assert_close(ft[-(m * (m + 1) // 2):, 0], to.decoder_attentions[1][-1].mean(0)[:m, :m][causal])

    # identical models: the attention term, cross-attention included, is exactly 0
    objective = AttentionKD()
    objective.setup(teacher, teacher)
    with objective_attached(teacher, teacher, objective), torch.no_grad():
        out = t5_outputs(teacher, batch, objective)
    fs, ft = objective.stack_features(out, out, source, target)
    assert torch.equal(fs, ft) and len(objective.outputs()) == 3


def test_progressive_on_t5_walks_the_encoder_then_the_decoder(tok):
    """Stages: each mapped encoder layer, then each mapped decoder layer, then logit KD. A decoder stage trains
    decoder blocks alone and matches decoder hidden states on the target positions."""
    import torch.nn.functional as F

    student, teacher = t5_pair(tok)  # encoder 2 -> 4, decoder 1 -> 2
    objective = make_objective("progressive", {"feature_weight": 0.5})
    objective.setup(student, teacher)
    assert objective.stage_pairs == [("encoder", 1, 2), ("encoder", 2, 4), ("decoder", 1, 2)]
    assert objective.schedule(8) == [2, 1, 1, 4]
    def part(name):  # "encoder.block.1.layer.0..." -> "encoder.1"; "encoder.final_layer_norm.weight" -> "encoder"
        bits = name.split(".")
        return f"{bits[0]}.{bits[2]}" if bits[1:2] == ["block"] else bits[0]

    stages = objective.stage_parameters(student)
    names = [{part(n) for n, p in student.named_parameters() if any(p is q for q in group)} for group in stages]
    assert names[:3] == [{"shared", "encoder.0"}, {"encoder.1"}, {"decoder.0"}]
    # the final stage trains everything, the final norms (and an untied LM head) only there
    assert {id(p) for p in stages[3]} == {id(p) for p in student.parameters()}
    assert {"encoder", "decoder"} <= names[3] and not {"encoder", "decoder"} & set().union(*names[:3])
    sparse = make_objective("progressive", {"layer_map": {2: 4}, "decoder_layer_map": {1: 1}})
    sparse.setup(student, teacher)
    assert sparse.stage_pairs == [("encoder", 2, 4), ("decoder", 1, 1)]

    g = torch.Generator().manual_seed(0)

    def outputs(width, enc, dec):
        return SimpleNamespace(logits=torch.randn(2, 3, 50, generator=g),
                               encoder_hidden_states=[torch.randn(2, 4, width, generator=g) for _ in range(enc + 1)],
                               decoder_hidden_states=[torch.randn(2, 3, width, generator=g) for _ in range(dec + 1)])

    s, t = outputs(16, 2, 1), outputs(32, 4, 2)
    source_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    target_mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    labels = torch.tensor([[3, 4, 1], [5, -100, -100]])
    with torch.no_grad():
        for stage, (stack, si, ti, mask) in enumerate([("encoder", 1, 2, source_mask), ("decoder", 1, 2, target_mask)],
                                                      start=1):
            objective.stage = 1 if stack == "encoder" else 3
            lin = objective.modules[f"{stack}_{si}"]
            hs, ht = getattr(s, f"{stack}_hidden_states")[si], getattr(t, f"{stack}_hidden_states")[ti]
            expected = 0.5 * F.mse_loss(lin(hs[mask.bool()]), ht[mask.bool()]).item()
            got = objective.loss(s, t, labels, attention_mask=source_mask, decoder_attention_mask=target_mask)
            assert got.item() == pytest.approx(expected, rel=1e-6), (stage, stack)
        objective.stage = None
        assert objective.loss(s, t, labels, attention_mask=source_mask, decoder_attention_mask=target_mask).item() > 0


def test_sequence_method_defaults_to_pure_sequence_level_kd():
    objective = make_objective("sequence", {"num_beams": 4})
    assert isinstance(objective, SequenceKD) and objective.teacher_decoding.num_beams == 4
    assert (objective.params.alpha, objective.params.num_beams, objective.params.keep_references) == (0.0, 4, False)


@pytest.fixture(scope="module")
def barts(data, tmp_path_factory):
    return save_tiny_bart_pair(tmp_path_factory.mktemp("bart"), heads.get("seq2seq").texts(data.train))


def test_progressive_finds_barts_encoder_and_decoder_layers(barts):
    from transformers import BartForConditionalGeneration

    from kdbench.introspect import stack_blocks

    model = BartForConditionalGeneration.from_pretrained(barts[1])
    stacks = stack_blocks(model)
    assert stacks["encoder"] is model.model.encoder.layers and stacks["decoder"] is model.model.decoder.layers
