"""Language-modelling heads (causal and masked): packing, masking, loss alignment, perplexity and token
accuracy, checked against transformers' own losses, and what the Distiller distils for each."""

import copy
import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

from kdbench import heads, models
from kdbench.errors import KdbenchError
from kdbench.heads import IGNORE
from kdbench.kernels import kd_loss
from kdbench.methods.base import DistillationConfig
from kdbench.methods.logit import LogitKD
from kdbench.suite import TrainingSettings
from kdbench.train.distiller import Distiller
from kdbench.train.loop import training_arguments

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


def test_causal_lm_records_next_token_accuracy_from_the_same_pass(tok, lm):
    head = heads.get("causal_lm")
    rows = head.encode([{"text": t} for t in TEXTS], tok, 16)
    batch = head.collator(tok)(rows)
    with torch.no_grad():
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    hits = [int(logits[b, i].argmax()) == int(batch["input_ids"][b, i + 1])
            for b in range(len(rows)) for i in range(15)]
    perplexity, extra = head.measure(lm, rows, head.collator(tok), "cpu")
    assert perplexity == pytest.approx(head.evaluate(lm, rows, head.collator(tok), "cpu"))
    assert extra == {"token accuracy": pytest.approx(sum(hits) / len(hits))}
    oracle = torch.nn.Module()  # a model whose top logit at position i is always token i + 1
    oracle.forward = lambda input_ids, **kw: type("Out", (), {
        "logits": torch.nn.functional.one_hot(input_ids.roll(-1, 1), len(tok)).float()})()
    assert head.measure(oracle, rows, head.collator(tok), "cpu")[1] == {"token accuracy": 1.0}


def greedy_continuation(model, prompt: list[int], new: int, eos: int) -> list[int]:
    """The oracle: argmax decoding by hand, one full forward pass per token, through the first eos."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == eos:
                break
    return ids[len(prompt):]


def test_causal_lm_sequence_level_kd_rows_are_the_teachers_continuations(tok, lm):
    head = heads.get("causal_lm")
    rows = head.encode([{"text": t} for t in TEXTS], tok, 16)[:5]
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    for prompt_length, max_new, want_prompt, want_new in ((6, None, 6, 10), (None, 3, 8, 3)):
        relabelled = head.decoded_targets(lm, rows, tok, "cpu", max_len=16, max_new_tokens=max_new,
                                          prompt_length=prompt_length)
        assert len(relabelled) == len(rows)
        for row, new in zip(rows, relabelled):
            prompt = row["input_ids"][:want_prompt]
            continuation = greedy_continuation(lm, prompt, want_new, eos)
            assert new["input_ids"] == prompt + continuation and len(new["input_ids"]) <= 16
            assert new["labels"] == [IGNORE] * want_prompt + continuation
            assert new["attention_mask"] == [1] * len(new["input_ids"])
    # with prompt_loss the prompt's own tokens are labels too: the same rows, the same continuations
    without = head.decoded_targets(lm, rows, tok, "cpu", max_len=16, prompt_length=6)
    with_prompt = head.with_prompt_loss(without)
    for a, b in zip(with_prompt, without):
        assert a["input_ids"] == b["input_ids"] and a["labels"] == a["input_ids"] != b["labels"]
    # a teacher that often says eos: each continuation ends after its first eos, wherever the batch's others end
    talkative = copy.deepcopy(lm)
    with torch.no_grad():
        talkative.lm_head.weight[eos] = talkative.lm_head.weight[46] * 2  # eos wherever token 46 would win
    relabelled = head.decoded_targets(talkative, rows, tok, "cpu", max_len=16, prompt_length=6)
    ends = [r["input_ids"][6:] for r in relabelled]
    assert ends == [greedy_continuation(talkative, r["input_ids"][:6], 10, eos) for r in rows]
    assert any(e[-1] == eos and len(e) < 10 for e in ends) and any(len(e) == 10 and eos not in e for e in ends)
    # prompts of two lengths (a short last block) are batched apart: no padding inside a prompt
    short = [rows[0], {**rows[1], "input_ids": rows[1]["input_ids"][:4]}]
    [a, b] = head.decoded_targets(lm, short, tok, "cpu", max_len=16, prompt_length=6)
    assert b["input_ids"][:3] == rows[1]["input_ids"][:3] and b["labels"][:3] == [IGNORE] * 3
    assert b["input_ids"][3:] == greedy_continuation(lm, rows[1]["input_ids"][:3], 10, eos)
    with pytest.raises(KdbenchError, match="^prompt_length 16 leaves no room to continue within max_seq_length 16$"):
        head.decoded_targets(lm, rows, tok, "cpu", max_len=16, prompt_length=16)


def test_continuation_metric_scores_greedy_continuations_of_each_blocks_first_half(tok, lm, monkeypatch):
    from kdbench.heads.generation import score_generations

    head = heads.get("causal_lm", continuation_metric="rouge_l")
    rows = head.encode([{"text": t} for t in TEXTS], tok, 16)[:6]
    short = rows[0]["input_ids"][:7]  # a short last block: 3 + 4 tokens
    rows.append({"input_ids": short, "attention_mask": [1] * 7, "labels": short})
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id

    def cut(ids):
        return ids[: ids.index(eos) + 1] if eos in ids else ids

    golds = [cut(r["input_ids"][len(r["input_ids"]) // 2:]) for r in rows]
    assert any(eos in g and len(g) < 8 for g in golds)  # some documents end inside the second half
    hyps = [greedy_continuation(lm, r["input_ids"][: len(r["input_ids"]) // 2], len(r["input_ids"]) -
                                len(r["input_ids"]) // 2, eos) for r in rows]
    want = score_generations("rouge_l", tok.batch_decode(hyps, skip_special_tokens=True),
                             tok.batch_decode(golds, skip_special_tokens=True))
    _, extra = head.measure(lm, rows, head.collator(tok), "cpu")
    assert extra["continuation ROUGE-L"] == pytest.approx(want)
    # a model that finishes every document exactly scores 1, one that stops at
    # once scores only where the document ended
    exact = heads.get("causal_lm", continuation_metric="exact_match")
    gold_of = {tuple(r["input_ids"][: len(r["input_ids"]) // 2]): r["input_ids"][len(r["input_ids"]) // 2:]
               for r in rows}
    monkeypatch.setattr(type(exact), "generate", lambda self, model, prompts, *a, **kw: [
        cut(gold_of[tuple(p)]) for p in prompts])
    assert exact.continuation_score(lm, rows, tok, "cpu") == 1.0
    monkeypatch.setattr(type(exact), "generate", lambda self, model, prompts, *a, **kw: [[eos] for _ in prompts])
    ended = sum(g == [eos] for g in golds)  # documents that end with the prompt: stopping is right there
    assert exact.continuation_score(lm, rows, tok, "cpu") == ended / len(rows) < 0.5


def test_lm_metrics_do_not_depend_on_the_chunking(tok, lm, monkeypatch):
    """The LM heads sum their metric over chunks of rows (on the model's device): chunks of 1 and 7 rows and
    one chunk for the whole batch give the same perplexity and token accuracy."""
    head = heads.get("causal_lm")
    rows = head.encode([{"text": t} for t in TEXTS], tok, 16)
    whole = head.measure(lm, rows, head.collator(tok), "cpu")
    for rows_per_chunk in (1, 7):
        monkeypatch.setattr(type(head), "CHUNK_ELEMENTS", rows_per_chunk * len(tok))
        perplexity, extra = head.measure(lm, rows, head.collator(tok), "cpu")
        assert perplexity == pytest.approx(whole[0], rel=1e-6) and extra == whole[1]


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


@pytest.fixture(scope="module")
def mlm(tok):
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return BertForMaskedLM(config).eval()


def masked_rows(tok, max_len=16):
    return heads.get("masked_lm").encode([{"text": t} for t in TEXTS], tok, max_len)


def test_masked_lm_packs_like_the_causal_head_and_masks_bert_style(tok):
    head = heads.get("masked_lm")
    rows = masked_rows(tok)
    assert [r["input_ids"] for r in rows] == [r["input_ids"] for r in heads.get("causal_lm").encode(
        [{"text": t} for t in TEXTS], tok, 16)]
    collate = head.collator(tok)
    clean = torch.tensor([r["input_ids"] for r in rows] * 200)  # 9,600 block tokens
    torch.manual_seed(0)
    ids, labels = collate.mask(clean.clone(), clean.clone())
    special = torch.isin(clean, torch.tensor(tok.all_special_ids))
    chosen = labels != IGNORE
    assert not (chosen & special).any()  # [CLS] / [SEP] are never masked
    assert torch.equal(labels[chosen], clean[chosen]) and torch.equal(ids[~chosen], clean[~chosen])
    assert chosen.sum() / (~special).sum() == pytest.approx(0.15, abs=0.015)
    as_mask = (ids == tok.mask_token_id) & chosen
    kept = (ids == clean) & chosen
    assert as_mask.sum() / chosen.sum() == pytest.approx(0.8, abs=0.03)
    assert kept.sum() / chosen.sum() == pytest.approx(0.1 + 0.1 / len(tok), abs=0.03)  # 10% kept (+ random hits)


def test_masked_lm_training_batches_get_a_fresh_mask_and_profiling_batches_none(tok):
    collate = heads.get("masked_lm").collator(tok)
    rows = masked_rows(tok)
    first, second = collate(rows), collate(rows)
    assert not torch.equal(first["labels"], second["labels"])  # a new mask per batch
    for b in (first, second):
        assert (b["labels"] != IGNORE).all(-1).logical_not().all() and (b["labels"] != IGNORE).any(-1).all()
    profiling = collate([{k: v for k, v in r.items() if k != "labels"} for r in rows])
    assert profiling.get("labels") is None
    assert torch.equal(profiling["input_ids"], torch.tensor([r["input_ids"] for r in rows]))
    # a row whose draw chose nothing still gets one masked token: no batch is all ignored (a NaN loss)
    one = collate([{"input_ids": [2, 40, 3], "attention_mask": [1, 1, 1], "labels": [2, 40, 3]}] * 30)
    assert (one["labels"][:, 1] == 40).all() and (one["labels"][:, [0, 2]] == IGNORE).all()


def test_masked_lm_loss_and_perplexity_match_transformers(tok, mlm):
    head = heads.get("masked_lm")
    rows = masked_rows(tok)
    collate = head.collator(tok)
    torch.manual_seed(1)
    batch = collate(rows)
    with torch.no_grad():
        out = mlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(head.hard_loss(out.logits, batch["labels"]), out.loss, rtol=1e-5, atol=1e-6)
    # the metric: exp of BertForMaskedLM's own mean loss over the eval split's fixed masked tokens
    fixed = collate.pad([collate.fixed(r, head.eval_seed + i) for i, r in enumerate(rows)])
    with torch.no_grad():
        loss = mlm(**{k: fixed[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert head.evaluate(mlm, rows, collate, "cpu", batch_size=5) == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_masked_lm_token_accuracy_counts_the_fixed_masked_tokens_only(tok, mlm):
    head = heads.get("masked_lm")
    rows = masked_rows(tok)
    collate = head.collator(tok)
    fixed = collate.pad([collate.fixed(r, head.eval_seed + i) for i, r in enumerate(rows)])
    with torch.no_grad():
        logits = mlm(input_ids=fixed["input_ids"], attention_mask=fixed["attention_mask"]).logits
    chosen = fixed["labels"] != IGNORE
    want = (logits.argmax(-1)[chosen] == fixed["labels"][chosen]).float().mean().item()
    _, extra = head.measure(mlm, rows, collate, "cpu")
    assert extra == {"token accuracy": pytest.approx(want)} and 0 < chosen.sum() < chosen.numel() / 2


def test_masked_lm_eval_mask_is_fixed_whatever_the_rng_and_batch_size(tok, mlm):
    head = heads.get("masked_lm")
    rows = masked_rows(tok)
    torch.manual_seed(0)
    a = head.evaluate(mlm, rows, head.collator(tok), "cpu", batch_size=64)
    torch.manual_seed(123)
    b = head.evaluate(mlm, rows, head.collator(tok), "cpu", batch_size=3)
    assert a == pytest.approx(b, rel=1e-6) and 1.0 < a < float("inf")
    collate = head.collator(tok)
    assert collate.fixed(rows[0], 7) == collate.fixed(rows[0], 7) != collate.fixed(rows[0], 8)
    assert not heads.get("masked_lm").higher_is_better and head.metric_name == "perplexity"


def test_a_task_sets_the_masking_rate_and_the_eval_mask(tok, mlm):
    from kdbench.errors import KdbenchError
    from kdbench.tasks import load_task, tasks

    data = load_task("generated_lm", {"train_size": 4, "eval_size": 2, "objective": "masked",
                                      "mask_probability": 0.4, "eval_mask_seed": 9})
    head = heads.get(data.head, **data.head_params)
    assert (head.probability, head.eval_seed) == (0.4, 9)
    clean = torch.tensor([r["input_ids"] for r in masked_rows(tok)] * 200)
    torch.manual_seed(0)
    _, labels = head.collator(tok).mask(clean.clone(), clean.clone())
    special = torch.isin(clean, torch.tensor(tok.all_special_ids))
    assert (labels != IGNORE).sum() / (~special).sum() == pytest.approx(0.4, abs=0.02)
    rows = masked_rows(tok)
    default = heads.get("masked_lm")
    # another eval seed masks other tokens: another perplexity for the same model
    assert head.evaluate(mlm, rows, head.collator(tok), "cpu") != pytest.approx(
        default.evaluate(mlm, rows, default.collator(tok), "cpu"), rel=1e-4)
    with pytest.raises(KdbenchError, match=r"^task 'generated_lm': params: mask_probability needs objective: masked$"):
        tasks.validate_params("generated_lm", {"mask_probability": 0.2})


def test_distiller_distills_masked_lm_logits_at_masked_positions_only(tok, mlm, tmp_path):
    """DistilBERT's MLM distillation: kd_loss over the masked positions of the shared batch, nothing else."""
    head = heads.get("masked_lm")
    rows = masked_rows(tok)[:4]
    teacher = BertForMaskedLM(mlm.config).eval()
    student = BertForMaskedLM(mlm.config)
    args = training_arguments(TrainingSettings(max_steps=1, batch_size=4), seed=0, device="cpu",
                              output_dir=str(tmp_path))
    trainer = Distiller(model=student, args=args, teacher=teacher, head=head,
                        objective=LogitKD(DistillationConfig(temperature=2.0, alpha=0.6)))
    torch.manual_seed(0)
    batch = head.collator(tok)(rows)
    student.eval()  # no dropout, so that the loss can be recomputed
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        s, t = student(input_ids=batch["input_ids"]).logits, teacher(input_ids=batch["input_ids"]).logits
    m = batch["labels"] != IGNORE
    assert 0 < m.sum() < m.numel()
    expected = kd_loss(s[m], t[m], batch["labels"][m], temperature=2.0, alpha=0.6)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    everywhere = kd_loss(s, t, batch["input_ids"], temperature=2.0, alpha=0.6)  # every position as a target
    assert not torch.allclose(loss.detach(), everywhere)
