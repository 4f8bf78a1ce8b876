"""fused_linear in the Distiller: the output layers run inside the loss (kdbench.output_layer), with the same loss
and gradients as the logits the models would have returned, and one-line refusals where that is not exact."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from kdbench import heads, models, output_layer
from kdbench.errors import KdbenchError
from kdbench.methods import methods
from kdbench.methods.attention import AttentionKD, AttentionParams
from kdbench.methods.base import DistillationConfig
from kdbench.methods.hidden import HiddenParams, HiddenStateKD
from kdbench.methods.logit import LogitKD
from kdbench.suite import TrainingSettings
from kdbench.tasks import load_task
from kdbench.train.distiller import Distiller
from kdbench.train.loop import training_arguments
from tiny import labelled_batch, tiny_bert, tiny_t5

TEXTS = ["the plot was not good => negative", "the cast seemed never dull but the music was fine => positive",
         "the film was great => positive", "the story felt hardly brilliant => negative"] * 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return models.train_tokenizer(TEXTS, 200, tmp_path_factory.mktemp("tok"))


def llama(vocab, hidden, seed, attn="sdpa", **fields):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, intermediate_size=2 * hidden,
                                        max_position_embeddings=64, attn_implementation=attn, **fields)).eval()


def gpt2(vocab, hidden, seed):  # tied input and output embeddings
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=1, n_head=2, n_positions=64)).eval()


def bert_mlm(vocab, hidden, seed):  # an output layer with a bias, behind a transform
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=2 * hidden,
                                      max_position_embeddings=64)).eval()


def lm_batch(tok, kind):
    head = heads.get(kind)
    if kind == "seq2seq":
        data = load_task("generated_seq2seq", {"train_size": 8, "eval_size": 4})
        rows = head.encode(data.train[:4], tok, 24)
    else:
        rows = head.encode([{"text": t} for t in TEXTS], tok, 12)[:4]
        if kind == "masked_lm":
            rows = [{**r, "labels": [x if i % 3 == 0 else -100 for i, x in enumerate(r["input_ids"])]} for r in rows]
    return head, head.collator(tok)(rows)


PAIRS = {
    "llama": ("causal_lm", lambda v: (llama(v, 16, 2), llama(v, 32, 1))),
    "gpt2": ("causal_lm", lambda v: (gpt2(v, 16, 2), gpt2(v, 32, 1))),
    "bert": ("masked_lm", lambda v: (bert_mlm(v, 16, 2), bert_mlm(v, 32, 1))),
}


def distiller(tmp_path, student, teacher, head, objective):
    args = training_arguments(TrainingSettings(), seed=0, device="cpu", output_dir=str(tmp_path))
    return Distiller(model=student, args=args, teacher=teacher, head=head, objective=objective)


def loss_and_grads(trainer, student, batch):
    student.zero_grad()
    loss = trainer.compute_loss(student, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def assert_same_training_signal(trainer, student, batch, fused_params, rtol=1e-5):
    objective = trainer.objective
    plain = objective.params
    want, want_grads = loss_and_grads(trainer, student, batch)
    objective.params = fused_params
    got, got_grads = loss_and_grads(trainer, student, batch)
    objective.params = plain
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-7)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:  # the output layer's weight (tied or not) and bias included
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=rtol, atol=1e-7, msg=name)


@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_fused_linear_gives_the_models_own_loss_and_gradients(tok, tmp_path, pair, divergence):
    kind, make = PAIRS[pair]
    student, teacher = make(len(tok))
    head, batch = lm_batch(tok, kind)
    params = DistillationConfig(temperature=2.0, alpha=0.6, divergence=divergence)
    trainer = distiller(tmp_path, student, teacher, head, LogitKD(params))
    assert_same_training_signal(trainer, student, batch, params.model_copy(update={"fused_linear": True}))


def test_fused_linear_on_t5_whose_output_layer_reads_rescaled_states(tok, tmp_path):
    head, batch = lm_batch(tok, "seq2seq")
    student, teacher = tiny_t5(tok, seed=2), tiny_t5(tok, seed=1, d_model=32, d_ff=64)
    params = DistillationConfig(temperature=2.0, alpha=0.6)
    trainer = distiller(tmp_path, student, teacher, head, LogitKD(params))
    assert_same_training_signal(trainer, student, batch, params.model_copy(update={"fused_linear": True}))


@pytest.mark.parametrize("method", ["hidden", "attention"])
def test_fused_linear_keeps_the_feature_terms_of_layer_methods(tok, tmp_path, method):
    student, teacher = llama(len(tok), 16, 2, "eager"), llama(len(tok), 32, 1, "eager")
    head, batch = lm_batch(tok, "causal_lm")
    objective = (HiddenStateKD(HiddenParams(feature_weight=0.5, temperature=2.0)) if method == "hidden"
                 else AttentionKD(AttentionParams(feature_weight=3.0, temperature=2.0)))
    trainer = distiller(tmp_path, student, teacher, head, objective)
    with torch.no_grad():  # the projections are trained too: give them a value that matters
        for p in (objective.modules.parameters() if objective.modules is not None else []):
            p.normal_()
    assert_same_training_signal(trainer, student, batch, objective.params.model_copy(update={"fused_linear": True}))


def test_the_output_layer_returns_a_placeholder_that_holds_no_memory(tok):
    model = llama(len(tok), 16, 0)
    _, batch = lm_batch(tok, "causal_lm")
    inputs = models.model_inputs(batch, model)
    with output_layer.captured(model) as layer:
        out = model(**inputs)
    assert out.logits.shape == (4, 12, len(tok)) and out.logits.stride() == (0, 0, 0)
    assert layer.hidden.shape == (4, 12, 16) and layer.weight is model.lm_head.weight
    assert "forward" not in vars(model.lm_head)  # restored
    torch.testing.assert_close(model.lm_head(layer.hidden), model(**inputs).logits)


def test_the_placeholder_survives_the_trainers_mixed_precision_wrapper(tok):
    """Under bf16/fp16 the Trainer's model forward goes through accelerate's convert_outputs_to_fp32, which casts
    half-precision outputs to fp32: a half-precision placeholder would become a real (B, L, V) tensor there."""
    from accelerate.utils import convert_outputs_to_fp32

    model = llama(len(tok), 16, 0)
    _, batch = lm_batch(tok, "causal_lm")
    forward = convert_outputs_to_fp32(model.forward)
    with output_layer.captured(model) as layer, torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward(**models.model_inputs(batch, model))
    assert out.logits.stride() == (0, 0, 0)
    assert layer.autocast == (True, torch.bfloat16)  # the loss makes its logits under the same autocast


def test_the_check_runs_once_per_model_and_draws_no_random_numbers(tok, tmp_path, monkeypatch):
    student = llama(len(tok), 16, 2, "eager", attention_dropout=0.5).train()  # its forward draws dropout masks
    teacher = llama(len(tok), 32, 1)
    head, batch = lm_batch(tok, "causal_lm")
    trainer = distiller(tmp_path, student, teacher, head, LogitKD(DistillationConfig(fused_linear=True)))
    checked = []
    real = output_layer.captured

    def spy(model, **kw):
        if not kw.get("placeholder", True):
            checked.append(kw["what"])
        return real(model, **kw)

    monkeypatch.setattr(output_layer, "captured", spy)
    state = torch.get_rng_state()
    output_layer.check_logits(student, models.model_inputs(batch, student), "the student")
    assert torch.equal(torch.get_rng_state(), state)
    student(**models.model_inputs(batch, student))
    assert not torch.equal(torch.get_rng_state(), state)  # the test can see a draw
    trainer.compute_loss(student, dict(batch))
    trainer.compute_loss(student, dict(batch))
    assert checked == ["the student", "the teacher"]  # once each, never again


class Softcapped(torch.nn.Module):
    """A causal LM that squashes its logits after the output layer (as Gemma 2's soft-capping does)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def get_output_embeddings(self):
        return self.lm.lm_head

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out.logits = torch.tanh(out.logits)
        return out


def test_a_model_that_changes_its_logits_after_the_output_layer_is_refused(tok, tmp_path):
    teacher = Softcapped(llama(len(tok), 32, 1))
    student = llama(len(tok), 16, 2)
    head, batch = lm_batch(tok, "causal_lm")
    trainer = distiller(tmp_path, student, teacher, head, LogitKD(DistillationConfig(fused_linear=True)))
    with pytest.raises(KdbenchError, match=r"^fused_linear: the teacher \(Softcapped\) changes its logits after "
                                           r"the output layer .*; use the method without fused_linear$"):
        trainer.compute_loss(student, dict(batch))


def test_bart_with_a_final_logits_bias_is_refused_and_without_one_accepted(tok, tmp_path):
    def bart(seed, bias):
        torch.manual_seed(seed)
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
            pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.pad_token_id)).eval()
        model.final_logits_bias.fill_(bias)
        return model

    head, batch = lm_batch(tok, "seq2seq")
    student = bart(2, 0.0)
    trainer = distiller(tmp_path, student, bart(1, 0.0), head, LogitKD(DistillationConfig(fused_linear=True)))
    trainer.compute_loss(student, dict(batch))
    trainer = distiller(tmp_path, student, bart(1, 0.5), head, LogitKD(DistillationConfig(fused_linear=True)))
    with pytest.raises(KdbenchError, match=r"the teacher \(BartForConditionalGeneration\) changes its logits"):
        trainer.compute_loss(student, dict(batch))


def test_a_classifier_is_refused_in_one_line(tmp_path):
    trainer = distiller(tmp_path, tiny_bert(0), tiny_bert(1), heads.get("classification"),
                        LogitKD(DistillationConfig(fused_linear=True)))
    with pytest.raises(KdbenchError,
                       match="^fused_linear is for language-model tasks .*; this task has a classification head$"):
        trainer.compute_loss(trainer.student, labelled_batch(3, [0, 1, 2]))


def test_progressive_has_no_fused_linear():
    with pytest.raises(KdbenchError, match="^method 'progressive': params.fused_linear: unknown key$"):
        methods.validate_params("progressive", {"fused_linear": True})
    assert methods.validate_params("logit", {"fused_linear": True}).fused_linear
