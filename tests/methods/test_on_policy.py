"""On-policy KD (GKD): the student writes a share of its training batches by sampling, and learns the teacher's
distributions on them; from the heads' sampling to the Distiller's loss on the student's own text."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdbench import heads, models
from kdbench.errors import KdbenchError
from kdbench.heads import IGNORE
from kdbench.kernels import kd_loss
from kdbench.methods import methods
from kdbench.methods.on_policy import OnPolicyKD, OnPolicyParams
from kdbench.suite import TrainingSettings
from kdbench.tasks import load_task
from kdbench.train.distiller import Distiller
from kdbench.train.loop import training_arguments
from tiny import tiny_t5 as t5


TEXTS = ["the plot was not good => negative", "the cast seemed never dull but the music was fine => positive",
         "the film was great => positive", "the story felt hardly brilliant => negative"] * 6


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return models.train_tokenizer(TEXTS, 200, tmp_path_factory.mktemp("tok"))


def llama(tok, hidden, seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, intermediate_size=2 * hidden,
                                        max_position_embeddings=64)).eval()


def blocks(tok, n=4):
    head = heads.get("causal_lm")
    return head, head.encode([{"text": t} for t in TEXTS], tok, 16)[:n]


def test_sampling_at_a_tiny_temperature_is_greedy_and_at_one_follows_the_seed(tok):
    head, rows = blocks(tok)
    lm = llama(tok, 16, 0)
    greedy = head.decoded_targets(lm, rows, tok, "cpu", max_len=16, prompt_length=6)
    cold = head.decoded_targets(lm, rows, tok, "cpu", max_len=16, prompt_length=6, sample_temperature=1e-4)
    assert cold == greedy
    torch.manual_seed(3)
    hot = head.decoded_targets(lm, rows, tok, "cpu", max_len=16, prompt_length=6, sample_temperature=1.0)
    torch.manual_seed(3)
    assert head.decoded_targets(lm, rows, tok, "cpu", max_len=16, prompt_length=6, sample_temperature=1.0) == hot
    assert hot != greedy  # an untrained model's distribution is nearly flat: samples leave the argmax
    assert all(h["input_ids"][:6] == r["input_ids"][:6] and h["labels"][:6] == [IGNORE] * 6
               for h, r in zip(hot, rows))


def test_seq2seq_sampling_at_a_tiny_temperature_is_greedy(tmp_path):
    data = load_task("generated_seq2seq", {"train_size": 8, "eval_size": 4})
    head = heads.get("seq2seq")
    tok = models.train_tokenizer(head.texts(data.train), 300, tmp_path)
    rows = head.encode(data.train[:4], tok, 24)
    model = t5(tok, seed=1)
    greedy = head.decoded_targets(model, rows, tok, "cpu", max_len=24, max_new_tokens=6)
    cold = head.decoded_targets(model, rows, tok, "cpu", max_len=24, max_new_tokens=6, sample_temperature=1e-4)
    assert cold == greedy


def bound(tok, **params):
    """An OnPolicyKD for the causal head, bound as kdbench.run.prepare binds it (prompt_length 6, blocks of 16)."""
    head = heads.get("causal_lm")
    objective = OnPolicyKD(OnPolicyParams(**params))
    written = []

    def write(model, rows, device):
        written.append(rows)
        return head.decoded_targets(model, rows, tok, device, max_len=16, prompt_length=6, sample_temperature=1.0)

    objective.bind(write, head.collator(tok), seed=0)
    return objective, written


def test_a_student_batch_keeps_the_prompts_and_labels_the_students_continuation(tok):
    head, rows = blocks(tok)
    batch = head.collator(tok)(rows)
    objective, written = bound(tok, lmbda=1.0)
    student = llama(tok, 16, 2).train()
    torch.manual_seed(5)
    new = objective.prepare_batch(student, dict(batch))
    assert student.training  # generation ran in eval mode, training mode is back
    assert written == [[{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in rows]]
    torch.manual_seed(5)
    want = head.collator(tok)(head.decoded_targets(student, rows, tok, "cpu", max_len=16, prompt_length=6,
                                                   sample_temperature=1.0))
    student.train()
    assert new.keys() == want.keys() and all(torch.equal(new[k], want[k]) for k in want)
    assert torch.equal(new["input_ids"][:, :6], batch["input_ids"][:, :6])
    assert (new["labels"][:, :6] == IGNORE).all() and (new["labels"][:, 6:] != IGNORE).any()


@pytest.mark.parametrize("lmbda, written_share", [(0.0, 0.0), (1.0, 1.0), (0.3, None)])
def test_the_share_of_student_batches_is_lmbda_drawn_from_the_seed(tok, lmbda, written_share):
    head, rows = blocks(tok)
    batch = head.collator(tok)(rows)
    student = llama(tok, 16, 2)
    counts = []
    for _ in range(2):
        objective, written = bound(tok, lmbda=lmbda)
        for _ in range(40):
            objective.prepare_batch(student, dict(batch))
        counts.append(len(written))
    assert counts[0] == counts[1]  # the same seed draws the same steps
    share = counts[0] / 40
    assert share == written_share if written_share is not None else 0.1 < share < 0.5


def test_unbound_it_says_so_in_one_line(tok):
    head, rows = blocks(tok)
    with pytest.raises(KdbenchError, match=r"^method 'on_policy': no decoding bound"):
        OnPolicyKD(OnPolicyParams(lmbda=1.0)).prepare_batch(llama(tok, 16, 2), head.collator(tok)(rows))


def test_the_loss_is_the_divergence_on_the_students_own_text(tok, tmp_path):
    head, rows = blocks(tok)
    objective, _ = bound(tok, lmbda=1.0)
    seen = []
    prepare = objective.prepare_batch
    objective.prepare_batch = lambda model, inputs: seen.append(prepare(model, inputs)) or seen[-1]
    student, teacher = llama(tok, 16, 2), llama(tok, 32, 1)
    args = training_arguments(TrainingSettings(), seed=0, device="cpu", output_dir=str(tmp_path))
    trainer = Distiller(model=student, args=args, teacher=teacher, head=head, objective=objective)
    loss = trainer.compute_loss(student, head.collator(tok)(rows))
    [batch] = seen
    inputs = models.model_inputs(batch, student)
    with torch.no_grad():
        s, t = student(**inputs).logits, teacher(**inputs).logits
    _, labels = head.align(s, batch["labels"])
    want = kd_loss(s, t, labels, temperature=1.0, alpha=1.0, divergence="jsd", beta=0.5)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-7)


def test_defaults_are_gkds():
    p = methods.validate_params("on_policy", {})
    assert (p.divergence, p.beta, p.temperature, p.alpha, p.lmbda, p.sample_temperature) == (
        "jsd", 0.5, 1.0, 1.0, 0.5, 1.0)


def test_on_policy_with_fused_linear_gives_the_same_loss(tok, tmp_path):
    """The student's batch comes first, then the output layers run inside the loss: the same loss as with logits
    (the check that fused_linear runs once per model draws no random numbers, so the samples are the same)."""
    head, rows = blocks(tok)
    student, teacher = llama(tok, 16, 2), llama(tok, 32, 1)
    args = training_arguments(TrainingSettings(), seed=0, device="cpu", output_dir=str(tmp_path))
    losses = []
    for fused in (False, True):
        objective, _ = bound(tok, lmbda=1.0, fused_linear=fused)
        trainer = Distiller(model=student, args=args, teacher=teacher, head=head, objective=objective)
        torch.manual_seed(7)
        losses.append(trainer.compute_loss(student, head.collator(tok)(rows)).detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
