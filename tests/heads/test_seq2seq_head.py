"""The seq2seq head (T5) under teacher forcing: encoding, its loss against transformers' own, the Distiller's
alignment and a cached top-k teacher, and models built for it (inline and local T5)."""

import math

import pytest
import torch
from transformers import T5ForConditionalGeneration

from kdbench import heads, models
from kdbench.errors import KdbenchError
from kdbench.heads import IGNORE
from kdbench.kernels import kd_loss
from kdbench.methods.base import DistillationConfig
from kdbench.methods.logit import LogitKD, LogitParams
from kdbench.suite import InlineConfig, TrainingSettings
from kdbench.tasks import load_task
from kdbench.train.distiller import Distiller
from kdbench.train.loop import training_arguments
from tiny import T5
from tiny import tiny_t5 as t5


@pytest.fixture(scope="module")
def data():
    return load_task("generated_seq2seq", {"train_size": 40, "eval_size": 12})


@pytest.fixture(scope="module")
def tok(data, tmp_path_factory):
    return models.train_tokenizer(heads.get("seq2seq").texts(data.train), 300, tmp_path_factory.mktemp("tok"))


def test_seq2seq_encodes_source_target_and_the_shifted_decoder_inputs(data, tok):
    head = heads.get("seq2seq")
    rows = head.encode(data.train[:8], tok, 32)
    first = rows[0]
    assert first["input_ids"] == tok(data.train[0]["source"])["input_ids"]
    target = tok(data.train[0]["target"], add_special_tokens=False)["input_ids"]
    assert first["labels"] == target + [tok.sep_token_id]  # the target ended by EOS (here [SEP]), no [CLS]
    assert first["decoder_input_ids"] == [tok.pad_token_id] + first["labels"][:-1]
    batch = head.collator(tok)(rows)
    assert batch["labels"].shape == batch["decoder_input_ids"].shape != batch["input_ids"].shape
    labelled = batch["labels"] != IGNORE
    assert not labelled.all() and torch.equal(labelled.sum(1), torch.tensor([len(r["labels"]) for r in rows]))
    # exactly what T5 builds from labels itself, wherever a label counts
    model = t5(tok)
    torch.testing.assert_close(batch["decoder_input_ids"][labelled], model._shift_right(batch["labels"])[labelled])
    short = head.encode(data.train[:1], tok, 3)[0]  # truncation keeps source and target within max_len
    assert len(short["input_ids"]) == len(short["labels"]) == len(short["decoder_input_ids"]) == 3
    assert head.encode([], tok, 8) == []


def test_seq2seq_loss_and_perplexity_match_transformers(data, tok):
    head = heads.get("seq2seq")
    rows = head.encode(data.eval, tok, 32)
    batch = head.collator(tok)(rows)
    model = t5(tok)
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        ours = model(**models.model_inputs(batch, model)).logits  # labels are dropped; decoder inputs from the rows
    torch.testing.assert_close(head.hard_loss(ours, batch["labels"]), own.loss, rtol=1e-5, atol=1e-6)
    # the metric: exp of T5's own mean token loss over the split (one batch here, so the means agree)
    assert head.evaluate(model, rows, head.collator(tok), "cpu", batch_size=5) == pytest.approx(
        math.exp(own.loss.item()), rel=1e-5)
    assert head.metric_name == "perplexity" and not head.higher_is_better


def test_distiller_distills_seq2seq_logits_without_a_shift(data, tok, tmp_path):
    """Decoder position i predicts label i: the KD loss is kd_loss over (B, Lt, V) against the labels as they are."""
    head = heads.get("seq2seq")
    rows = head.encode(data.train[:4], tok, 32)
    teacher, student = t5(tok, seed=1), t5(tok, seed=2)
    args = training_arguments(TrainingSettings(max_steps=1, batch_size=4), seed=0, device="cpu",
                              output_dir=str(tmp_path))
    trainer = Distiller(model=student, args=args, teacher=teacher, head=head,
                        objective=LogitKD(DistillationConfig(temperature=2.0, alpha=0.6)))
    batch = head.collator(tok)(rows)
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        inputs = models.model_inputs(batch, student)
        s, t = student(**inputs).logits, teacher(**inputs).logits
    y = batch["labels"]
    torch.testing.assert_close(loss.detach(), kd_loss(s, t, y, temperature=2.0, alpha=0.6), rtol=1e-5, atol=1e-6)
    shifted = kd_loss(s[:, :-1], t[:, :-1], y[:, 1:], temperature=2.0, alpha=0.6)
    assert not torch.allclose(loss.detach(), shifted)


@pytest.mark.parametrize("k", [3, 100_000])
def test_a_cached_top_k_teacher_lines_up_with_ragged_targets(data, tok, k, tmp_path):
    """cache_teacher_top_k once, then batches of rows with targets of different lengths (padded by TopKCollator):
    the loss is top_k_kd_loss of the teacher's top-k made from its logits on the same batch, and with k covering
    the vocabulary, kd_loss itself. The Distiller is given no teacher: the batches carry it."""
    from kdbench.kernels import teacher_top_k, top_k_kd_loss
    from kdbench.train import teacher_cache

    head = heads.get("seq2seq")
    rows = head.encode(data.train[:6], tok, 32)
    assert len({len(r["labels"]) for r in rows}) > 1  # ragged targets: the collator pads
    teacher, student = t5(tok, seed=1), t5(tok, seed=2)
    collator = head.collator(tok)
    cached = teacher_cache.cache_teacher_top_k(teacher, rows, collator, "cpu", k=k, temperature=2.0)
    assert [len(r["teacher_top_ids"]) for r in cached] == [len(r["labels"]) for r in rows]
    teacher_cache.save_teacher_top_k(tmp_path / "top.pt", cached)  # saved and loaded back, as a resumed suite does
    loaded = teacher_cache.load_teacher_top_k(tmp_path / "top.pt", rows)
    for a, b in zip(loaded, cached):
        assert all(torch.equal(a[key], b[key]) for key in teacher_cache.TopKCollator.KEYS)
    assert teacher_cache.load_teacher_top_k(tmp_path / "top.pt", rows[1:]) is None  # saved for other rows
    cached = loaded
    drawn = [teacher_cache.cache_teacher_top_k(teacher, rows, collator, "cpu", k=k, temperature=2.0, sampled=True)
             for _ in range(2)]
    for a, b in zip(*drawn):  # the draws are seeded by the rows: the same cache every time
        assert all(torch.equal(a[key], b[key]) for key in teacher_cache.TopKCollator.KEYS)
    objective = LogitKD(LogitParams(temperature=2.0, alpha=0.6, teacher_top_k=k))
    distiller = Distiller(model=student, args=training_arguments(TrainingSettings(max_steps=1), seed=0,
                                                                device="cpu", output_dir=str(tmp_path)),
                          teacher=None, head=head, objective=objective)
    batch = teacher_cache.TopKCollator(collator)(cached[1:5])
    loss = distiller.compute_loss(student, dict(batch))
    plain = collator(rows[1:5])
    with torch.no_grad():
        inputs = models.model_inputs(plain, student)
        s, t = student(**inputs).logits, teacher(**inputs).logits
    y = plain["labels"]
    want = top_k_kd_loss(s, *teacher_top_k(t, k, temperature=2.0), y, temperature=2.0, alpha=0.6)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    if k > s.shape[-1]:
        torch.testing.assert_close(loss.detach(), kd_loss(s, t, y, temperature=2.0, alpha=0.6), rtol=1e-5, atol=1e-6)


def test_seq2seq_texts_are_sources_and_targets():
    rows = [{"source": "a b", "target": "c"}, {"source": "d", "target": "e f"}]
    assert heads.get("seq2seq").texts(rows) == ["a b", "c", "d", "e f"]
    assert heads.get("classification").texts([{"text": "x", "label": 0}]) == ["x"]


def test_inline_t5_gets_a_decoder_start_token_and_is_described():
    ref = InlineConfig(**T5, d_model=16, d_ff=32)
    model = models.build_model(ref, head=heads.get("seq2seq"), num_labels=0, vocab_size=50, seed=0)
    assert isinstance(model, T5ForConditionalGeneration)
    assert model.config.decoder_start_token_id == model.config.pad_token_id == 0
    custom = models.build_model(InlineConfig(**T5, d_model=16, d_ff=32, decoder_start_token_id=3),
                                head=heads.get("seq2seq"), num_labels=0, vocab_size=50, seed=0)
    assert custom.config.decoder_start_token_id == 3
    assert models.describe(ref) == "t5 1L/16H"
    models.check_model_ref(InlineConfig(**T5, decoder_start_token_id=0), "pairs.p.student")
    with pytest.raises(KdbenchError, match="unknown bert config field 'decoder_start_token_id'"):
        models.check_model_ref(InlineConfig(model_type="bert", decoder_start_token_id=0), "pairs.p.student")


def test_a_local_t5_folder_loads_as_a_seq2seq_model(tok, tmp_path):
    """The from_pretrained path a hub name takes, on a folder (as t5-small's would be after a download)."""
    saved = t5(tok)
    saved.save_pretrained(str(tmp_path / "t5"))
    loaded = models.build_model(str(tmp_path / "t5"), head=heads.get("seq2seq"), num_labels=0, vocab_size=0, seed=0)
    assert isinstance(loaded, T5ForConditionalGeneration) and loaded.config.decoder_start_token_id == 0
    assert torch.equal(loaded.shared.weight, saved.shared.weight)
