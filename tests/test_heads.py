"""Heads: encoding, loss alignment and metrics per task kind, checked against transformers' own losses."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdbench import heads, models
from kdbench.errors import KdbenchError
from kdbench.kernels import kd_loss
from kdbench.methods import DistillationConfig, LogitKD
from kdbench.suite import TrainingSettings
from kdbench.trainer import Distiller, training_arguments

TEXTS = ["the plot was not good => negative", "the cast seemed never dull but the music was fine => positive",
         "the film was great => positive", "the story felt hardly brilliant => negative"] * 6


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return models.train_tokenizer(TEXTS, 200, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def lm(tok):
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_registry_names_the_culprit():
    with pytest.raises(KdbenchError, match="unknown head 'seq3seq'; available: causal_lm, classification"):
        heads.get("seq3seq")


def test_causal_lm_packs_texts_into_full_blocks(tok):
    head = heads.get("causal_lm")
    per_text = tok(TEXTS)["input_ids"]
    assert all(ids[-1] == tok.sep_token_id for ids in per_text)  # the template ends each text: no extra EOS
    stream = [i for ids in per_text for i in ids]
    blocks = head.encode([{"text": t} for t in TEXTS], tok, 16)
    assert len(blocks) == len(stream) // 16  # the ragged tail is dropped
    assert [i for b in blocks for i in b["input_ids"]] == stream[: 16 * len(blocks)]
    assert all(b["labels"] == b["input_ids"] and b["attention_mask"] == [1] * 16 for b in blocks)
    one = head.encode([{"text": TEXTS[0]}], tok, 512)  # shorter than a block: one short block
    assert len(one) == 1 and one[0]["input_ids"] == per_text[0]
    assert head.encode([], tok, 16) == []


def test_causal_lm_appends_eos_when_the_tokenizer_does_not(tok):
    plain = type("Plain", (), {"eos_token_id": 99, "sep_token_id": None,
                               "__call__": lambda self, texts: {"input_ids": [[5, 6], [7]]}})()
    blocks = heads.get("causal_lm").encode([{"text": "a"}, {"text": "b"}], plain, 8)
    assert blocks[0]["input_ids"] == [5, 6, 99, 7, 99]


def test_causal_lm_loss_and_perplexity_match_transformers(tok, lm):
    head = heads.get("causal_lm")
    rows = head.encode([{"text": t} for t in TEXTS], tok, 16)
    batch = head.collator(tok)(rows)
    with torch.no_grad():
        out = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    ours = head.hard_loss(out.logits, batch["labels"])
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-6)
    # full blocks: every block has the same number of predicted tokens, so exp(mean loss) is the perplexity
    assert head.evaluate(lm, rows, head.collator(tok), "cpu", batch_size=3) == pytest.approx(
        math.exp(out.loss.item()), rel=1e-5)


def test_retention_is_one_for_the_teacher_and_less_when_worse():
    acc, ppl = heads.get("classification"), heads.get("causal_lm")
    assert acc.retention(0.8, 0.9) == pytest.approx(0.8 / 0.9) and ppl.retention(12.0, 6.0) == pytest.approx(0.5)
    assert acc.retention(0.9, 0.9) == ppl.retention(6.0, 6.0) == 1.0
    assert acc.retention(0.5, None) is None and not ppl.higher_is_better and acc.higher_is_better


def test_distiller_shifts_causal_lm_logits_before_the_loss(tok, lm, tmp_path):
    """The KD loss of a causal LM is kd_loss over positions 0..L-2 against tokens 1..L-1, nothing else."""
    head = heads.get("causal_lm")
    rows = head.encode([{"text": t} for t in TEXTS], tok, 16)[:4]
    teacher = LlamaForCausalLM(lm.config).eval()
    student = LlamaForCausalLM(lm.config)
    args = training_arguments(TrainingSettings(max_steps=1, batch_size=4), seed=0, device="cpu",
                              output_dir=str(tmp_path))
    config = DistillationConfig(temperature=2.0, alpha=0.6)
    trainer = Distiller(model=student, args=args, teacher=teacher, objective=LogitKD(config), head=head)
    batch = head.collator(tok)(rows)
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        s, t = student(input_ids=batch["input_ids"]).logits, teacher(input_ids=batch["input_ids"]).logits
    expected = kd_loss(s[:, :-1], t[:, :-1], batch["labels"][:, 1:], temperature=2.0, alpha=0.6)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    unshifted = kd_loss(s, t, batch["labels"], temperature=2.0, alpha=0.6)
    assert not torch.allclose(loss.detach(), unshifted)
